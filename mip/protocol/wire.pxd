# Declarations of mip_wire.h: byte order and bounds-checked header parsing. The header is
# csrc/mip_wire.h in the source tree and in the folder mip.get_include() names once installed.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "mip_wire.h" nogil:
    enum:
        MIP_OK
        MIP_NEED_MORE
        MIP_E_TRUNCATED
        MIP_E_TOO_LARGE
        MIP_E_VERSION
        MIP_E_KIND
        MIP_E_SUBTYPE
        MIP_E_COUNTS
        MIP_E_VALUE
        MIP_E_VALUE_TYPE
        MIP_E_MAGIC
        MIP_E_FRAME_TYPE
        MIP_E_MSG_KIND

    enum:
        MIP_HEADER_SIZE
        MIP_INFERENCE_HEADER_SIZE
        MIP_TLV_HEADER_SIZE
        MIP_VERSION
        MIP_KIND_ERROR
        MIP_KIND_PING
        MIP_KIND_INFERENCE
        MIP_KIND_ROUTED
        MIP_REQUEST
        MIP_RESPONSE
        MIP_TENSOR_MAX_NDIM
        MIP_TENSOR_ALIGN
        MIP_DT_BOOL
        MIP_DT_UINT8
        MIP_DT_UINT16
        MIP_DT_UINT32
        MIP_DT_UINT64
        MIP_DT_INT8
        MIP_DT_INT16
        MIP_DT_INT32
        MIP_DT_INT64
        MIP_DT_FP16
        MIP_DT_FP32
        MIP_DT_FP64
        MIP_DT_BYTES
        MIP_DT_BF16
        MIP_DT_MAX
        MSIP_HEADER_SIZE
        MSIP_VERSION
        MSIP_FRAME_TYPE_MAX
        MSIP_MSG_KIND_MAX

    const uint8_t mip_dtype_size[]

    uint16_t mip_load_be16(const unsigned char *p)
    uint32_t mip_load_be32(const unsigned char *p)
    uint64_t mip_load_be64(const unsigned char *p)
    uint32_t mip_load_le32(const unsigned char *p)
    void mip_store_be16(unsigned char *p, uint16_t v)
    void mip_store_be32(unsigned char *p, uint32_t v)
    void mip_store_be64(unsigned char *p, uint64_t v)
    void mip_store_le32(unsigned char *p, uint32_t v)

    ctypedef struct mip_header:
        uint8_t version
        uint8_t kind
        uint8_t subtype
        uint8_t reserved
        uint32_t remaining

    int mip_parse_header(const unsigned char *p, size_t len, uint64_t max_frame,
                         mip_header *h, size_t *err_off)

    ctypedef struct mip_tensor_header:
        uint8_t dtype
        uint8_t ndim
        uint8_t pad
        uint64_t nelem
        size_t data_off
        size_t data_len
        uint32_t dims[32]

    int mip_parse_tensor_header(const unsigned char *v, size_t len,
                                mip_tensor_header *t, size_t *err_off)
    unsigned mip_tensor_pad(size_t off)

    ctypedef struct msip_header:
        uint8_t version
        uint8_t flags
        uint16_t frame_type
        uint16_t msg_kind
        uint16_t reserved
        uint32_t payload_len
        uint64_t msg_id

    int msip_parse_header(const unsigned char *p, size_t len, uint64_t max_payload,
                          msip_header *h, size_t *err_off)
    void msip_write_header(unsigned char *p, uint8_t flags, uint16_t frame_type,
                           uint16_t msg_kind, uint32_t payload_len, uint64_t msg_id)
