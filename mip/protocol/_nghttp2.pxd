# cython: language_level=3
# libnghttp2's C API as mip.protocol._h2 uses it: the types, constants and functions it
# calls, and the mip_h2_* names that pick nghttp2's *2 entry points where the installed
# library has them. Declarations only: no module is built from this file.

from libc.stdint cimport uint8_t, int32_t, uint32_t, uint64_t

# nghttp2 1.61 deprecated the ssize_t entry points for *2 ones taking nghttp2_ssize; use
# them where the installed library has them, the older ones otherwise.
cdef extern from *:
    """
    #include <nghttp2/nghttp2.h>
    #if NGHTTP2_VERSION_NUM >= 0x013d00
    #define MIP_H2_API2 1
    typedef nghttp2_ssize mip_h2_ssize;
    typedef nghttp2_data_source_read_callback2 mip_h2_read_callback;
    typedef nghttp2_data_provider2 mip_h2_data_provider;
    #define mip_h2_mem_recv nghttp2_session_mem_recv2
    #define mip_h2_mem_send nghttp2_session_mem_send2
    #define mip_h2_submit_response nghttp2_submit_response2
    #define mip_h2_submit_request nghttp2_submit_request2
    #else
    #define MIP_H2_API2 0
    typedef ssize_t mip_h2_ssize;
    typedef nghttp2_data_source_read_callback mip_h2_read_callback;
    typedef nghttp2_data_provider mip_h2_data_provider;
    #define mip_h2_mem_recv nghttp2_session_mem_recv
    #define mip_h2_mem_send nghttp2_session_mem_send
    #define mip_h2_submit_response nghttp2_submit_response
    #define mip_h2_submit_request nghttp2_submit_request
    #endif
    """
    int MIP_H2_API2

cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        int cat
    ctypedef struct nghttp2_rst_stream:
        nghttp2_frame_hd hd
        uint32_t error_code
    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code
    ctypedef struct nghttp2_ping:
        nghttp2_frame_hd hd
        uint8_t opaque_data[8]
    ctypedef struct nghttp2_data:
        nghttp2_frame_hd hd
        size_t padlen
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_rst_stream rst_stream
        nghttp2_goaway goaway
        nghttp2_ping ping
        nghttp2_data data
    ctypedef union nghttp2_data_source:
        int fd
        void *ptr
    ctypedef ssize_t mip_h2_ssize
    ctypedef mip_h2_ssize (*mip_h2_read_callback)(
        nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
        uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept
    ctypedef struct mip_h2_data_provider:
        nghttp2_data_source source
        mip_h2_read_callback read_callback
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value

    enum:
        NGHTTP2_DATA = 0
        NGHTTP2_HEADERS = 1
        NGHTTP2_RST_STREAM = 3
        NGHTTP2_SETTINGS = 4
        NGHTTP2_PING = 6
        NGHTTP2_GOAWAY = 7
        NGHTTP2_FLAG_NONE = 0
        NGHTTP2_FLAG_END_STREAM = 1
        NGHTTP2_FLAG_ACK = 1
        NGHTTP2_HCAT_REQUEST = 0
        NGHTTP2_HCAT_RESPONSE = 1
        NGHTTP2_HCAT_PUSH_RESPONSE = 2
        NGHTTP2_HCAT_HEADERS = 3
        NGHTTP2_DATA_FLAG_EOF = 1
        NGHTTP2_DATA_FLAG_NO_END_STREAM = 2
        NGHTTP2_DATA_FLAG_NO_COPY = 4
        NGHTTP2_ERR_DEFERRED = -508
        NGHTTP2_ERR_CALLBACK_FAILURE = -902
        NGHTTP2_ERR_FLOODED = -904
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE = -521
        NGHTTP2_SETTINGS_HEADER_TABLE_SIZE = 1
        NGHTTP2_SETTINGS_ENABLE_PUSH = 2
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS = 3
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE = 4
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE = 5
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE = 6
        NGHTTP2_NO_ERROR = 0
        NGHTTP2_PROTOCOL_ERROR = 1
        NGHTTP2_INTERNAL_ERROR = 2
        NGHTTP2_REFUSED_STREAM = 7
        NGHTTP2_CANCEL = 8
        NGHTTP2_ENHANCE_YOUR_CALM = 11
        NGHTTP2_NV_FLAG_NONE = 0
        NGHTTP2_NV_FLAG_NO_COPY_NAME = 2
        NGHTTP2_NV_FLAG_NO_COPY_VALUE = 4

    ctypedef int (*on_begin_headers_cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*on_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
                                 const uint8_t *, size_t, uint8_t, void *) noexcept
    ctypedef int (*on_frame_recv_cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*on_data_chunk_recv_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *,
                                          size_t, void *) noexcept
    ctypedef int (*on_stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *) noexcept
    ctypedef int (*send_data_cb)(nghttp2_session *, nghttp2_frame *, const uint8_t *, size_t,
                                 nghttp2_data_source *, void *) noexcept
    ctypedef int (*on_frame_send_cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *, on_begin_headers_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_recv_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, on_data_chunk_recv_cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *, on_stream_close_cb)
    void nghttp2_session_callbacks_set_send_data_callback(nghttp2_session_callbacks *, send_data_cb)
    void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *, on_frame_send_cb)

    int nghttp2_option_new(nghttp2_option **option_ptr)
    void nghttp2_option_del(nghttp2_option *option)
    void nghttp2_option_set_max_send_header_block_length(nghttp2_option *option, size_t val)
    void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val)
    void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val)
    void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val)

    int nghttp2_session_server_new2(nghttp2_session **session_ptr,
                                    const nghttp2_session_callbacks *callbacks, void *user_data,
                                    const nghttp2_option *option)
    int nghttp2_session_client_new2(nghttp2_session **session_ptr,
                                    const nghttp2_session_callbacks *callbacks, void *user_data,
                                    const nghttp2_option *option)
    void nghttp2_session_del(nghttp2_session *session)
    mip_h2_ssize mip_h2_mem_recv(nghttp2_session *session, const uint8_t *data, size_t length)
    mip_h2_ssize mip_h2_mem_send(nghttp2_session *session, const uint8_t **data_ptr)
    int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_want_read(nghttp2_session *session)
    int nghttp2_session_want_write(nghttp2_session *session)
    int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
                                              int32_t stream_id, int32_t window_size)
    int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session)
    int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
                                const nghttp2_settings_entry *iv, size_t niv)
    int mip_h2_submit_response(nghttp2_session *session, int32_t stream_id,
                               const nghttp2_nv *nva, size_t nvlen,
                               const mip_h2_data_provider *data_prd)
    int32_t mip_h2_submit_request(nghttp2_session *session, const void *pri_spec,
                                  const nghttp2_nv *nva, size_t nvlen,
                                  const mip_h2_data_provider *data_prd, void *stream_user_data)
    int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id,
                               const nghttp2_nv *nva, size_t nvlen)
    int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                                  uint32_t error_code)
    int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
                              uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len)
    int nghttp2_submit_shutdown_notice(nghttp2_session *session)
    int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const uint8_t *opaque_data)
    const char *nghttp2_strerror(int lib_error_code)

# nghttp2 1.57 has a limiter of its own for streams the peer resets (default: a burst of
# 1000, then 33 a second), which answers GOAWAY INTERNAL_ERROR; distributions backported it
# to older versions, so the version number does not tell. The loaded library is asked for
# nghttp2_option_set_stream_reset_rate_limit by name: mip_h2_set_stream_reset_rate_limit
# calls it and returns 1 where it is there, returns 0 where it is not (nor the limiter).
cdef extern from *:
    """
    #include <dlfcn.h>
    #include <nghttp2/nghttp2.h>
    typedef void (*mip_h2_reset_limit_fn)(nghttp2_option *, uint64_t, uint64_t);
    static int mip_h2_reset_limit_looked_up = 0;
    static mip_h2_reset_limit_fn mip_h2_reset_limit = NULL;

    static int mip_h2_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
                                                  uint64_t rate) {
        if (!mip_h2_reset_limit_looked_up) {
            Dl_info info;
            void *lib;
            mip_h2_reset_limit_looked_up = 1;
            if (dladdr((void *)&nghttp2_option_new, &info) && info.dli_fname != NULL) {
                lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
                if (lib != NULL) {
                    *(void **)&mip_h2_reset_limit =
                        dlsym(lib, "nghttp2_option_set_stream_reset_rate_limit");
                    dlclose(lib);
                }
            }
        }
        if (mip_h2_reset_limit == NULL)
            return 0;
        mip_h2_reset_limit(option, burst, rate);
        return 1;
    }
    """
    int mip_h2_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
                                           uint64_t rate)
