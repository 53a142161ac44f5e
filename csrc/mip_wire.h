/*
 * Plain C helpers for the MIP and MSIP codecs: byte order, bounds-checked
 * header and tensor-header parsing. No Python.h: every function works on
 * (pointer, length) and returns a status code that the Cython layer maps to
 * one exception class in one place (raise_wire_error, mip/protocol/_stream.pyx).
 *
 * All header integers on both wires are big-endian; tensor data is
 * little-endian (the codec rejects big-endian hosts at import time).
 */
#ifndef MIP_WIRE_H
#define MIP_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- status codes (negative = error) --------------------------------- */
enum {
    MIP_OK = 0,
    MIP_NEED_MORE = 1,           /* not an error: a streaming parser waits */
    MIP_E_TRUNCATED = -1,        /* a declared size runs past the octets present */
    MIP_E_TOO_LARGE = -2,        /* a declared size exceeds the configured maximum */
    MIP_E_VERSION = -3,          /* unsupported protocol version */
    MIP_E_KIND = -4,             /* unknown MIP kind */
    MIP_E_SUBTYPE = -5,          /* bad subtype for the kind */
    MIP_E_COUNTS = -6,           /* counts/sizes contradict each other */
    MIP_E_VALUE = -7,            /* malformed value content */
    MIP_E_VALUE_TYPE = -8,       /* reserved, undefined TLV type */
    MIP_E_MAGIC = -9,            /* MSIP magic is not "MSIP" */
    MIP_E_FRAME_TYPE = -10,      /* unknown MSIP frame type */
    MIP_E_MSG_KIND = -11,        /* unknown MSIP msg_kind */
};

/* ---- byte order -------------------------------------------------------- */
static inline uint16_t mip_load_be16(const unsigned char *p) {
    return (uint16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]);
}
static inline uint32_t mip_load_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline uint64_t mip_load_be64(const unsigned char *p) {
    return ((uint64_t)mip_load_be32(p) << 32) | (uint64_t)mip_load_be32(p + 4);
}
static inline uint32_t mip_load_le32(const unsigned char *p) {
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[1] << 8) | (uint32_t)p[0];
}
static inline void mip_store_be16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}
static inline void mip_store_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static inline void mip_store_be64(unsigned char *p, uint64_t v) {
    mip_store_be32(p, (uint32_t)(v >> 32));
    mip_store_be32(p + 4, (uint32_t)v);
}
static inline void mip_store_le32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* ---- MIP fixed header ---------------------------------------------------- */
#define MIP_HEADER_SIZE 8
#define MIP_INFERENCE_HEADER_SIZE 4
#define MIP_TLV_HEADER_SIZE 8
#define MIP_VERSION 0
#define MIP_KIND_ERROR 0
#define MIP_KIND_PING 1
#define MIP_KIND_INFERENCE 2
#define MIP_KIND_ROUTED 3
#define MIP_KIND_MAX 3
#define MIP_REQUEST 0
#define MIP_RESPONSE 1

typedef struct {
    uint8_t version;
    uint8_t kind;
    uint8_t subtype;
    uint8_t reserved;
    uint32_t remaining;
} mip_header;

/* Parse and validate the fixed header at p (len octets available).
 * Returns MIP_NEED_MORE when fewer than 8 octets are present, an error for a
 * bad version/kind/subtype or a frame larger than max_frame (total octets,
 * header included), MIP_OK otherwise. *err_off gets the offending offset. */
static inline int mip_parse_header(const unsigned char *p, size_t len,
                                   uint64_t max_frame, mip_header *h,
                                   size_t *err_off) {
    *h = (mip_header){0};  /* every field defined on every return */
    if (len < MIP_HEADER_SIZE) return MIP_NEED_MORE;
    h->version = p[0];
    h->kind = p[1];
    h->subtype = p[2];
    h->reserved = p[3];
    h->remaining = mip_load_be32(p + 4);
    if (h->version != MIP_VERSION) { *err_off = 0; return MIP_E_VERSION; }
    if (h->kind > MIP_KIND_MAX) { *err_off = 1; return MIP_E_KIND; }
    if (h->kind != MIP_KIND_ERROR && h->subtype > MIP_RESPONSE) {
        *err_off = 2; return MIP_E_SUBTYPE;
    }
    if ((uint64_t)h->remaining + MIP_HEADER_SIZE > max_frame) {
        *err_off = 4; return MIP_E_TOO_LARGE;
    }
    return MIP_OK;
}

/* ---- tensor TLV header ------------------------------------------------- */
#define MIP_TENSOR_MAX_NDIM 32
#define MIP_TENSOR_ALIGN 8
/* Elements a tensor shape may describe (numpy's bound on 64-bit hosts, 8-octet items). */
#define MIP_TENSOR_MAX_ELEMENTS ((uint64_t)INT64_MAX / 8)

enum {
    MIP_DT_BOOL = 1, MIP_DT_UINT8, MIP_DT_UINT16, MIP_DT_UINT32, MIP_DT_UINT64,
    MIP_DT_INT8, MIP_DT_INT16, MIP_DT_INT32, MIP_DT_INT64,
    MIP_DT_FP16, MIP_DT_FP32, MIP_DT_FP64, MIP_DT_BYTES, MIP_DT_BF16,
    MIP_DT_MAX = MIP_DT_BF16
};

/* Octets per element of each wire datatype; 0 for BYTES (variable length). */
static const uint8_t mip_dtype_size[MIP_DT_MAX + 1] = {
    0, 1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 4, 8, 0, 2
};

typedef struct {
    uint8_t dtype;
    uint8_t ndim;
    uint8_t pad;
    uint64_t nelem;
    size_t data_off;   /* offset of the data from the start of the value */
    size_t data_len;
    uint32_t dims[MIP_TENSOR_MAX_NDIM];
} mip_tensor_header;

/* Parse the header of a tensor value (the octets of one TLV of type TENSOR).
 * Checks every field and that the data length agrees with the shape for
 * fixed-size dtypes; for BYTES it checks that each element could carry at
 * least its 4-octet length prefix. */
static inline int mip_parse_tensor_header(const unsigned char *v, size_t len,
                                          mip_tensor_header *t, size_t *err_off) {
    size_t need;
    uint64_t n = 1;
    uint64_t nonzero = 1;   /* product of the non-zero dims: numpy bounds it even when n is 0 */
    unsigned i;
    t->dtype = t->ndim = t->pad = 0;  /* defined on every return (dims: the first ndim only) */
    if (len < 4) { *err_off = 0; return MIP_E_VALUE; }
    t->dtype = v[0];
    t->ndim = v[1];
    t->pad = v[2];
    if (t->dtype == 0 || t->dtype > MIP_DT_MAX) { *err_off = 0; return MIP_E_VALUE; }
    if (t->ndim > MIP_TENSOR_MAX_NDIM) { *err_off = 1; return MIP_E_VALUE; }
    if (t->pad >= MIP_TENSOR_ALIGN) { *err_off = 2; return MIP_E_VALUE; }
    if (v[3] != 0) { *err_off = 3; return MIP_E_VALUE; }
    need = 4 + 4 * (size_t)t->ndim + t->pad;
    if (len < need) { *err_off = len; return MIP_E_VALUE; }
    for (i = 0; i < t->ndim; i++) {
        uint32_t d = mip_load_be32(v + 4 + 4 * i);
        t->dims[i] = d;
        if (d == 0) {
            n = 0;
            continue;
        }
        if (nonzero > MIP_TENSOR_MAX_ELEMENTS / d) { *err_off = 4 + 4 * i; return MIP_E_VALUE; }
        nonzero *= d;
        n *= d;
    }
    t->nelem = n;
    t->data_off = need;
    t->data_len = len - need;
    if (t->dtype == MIP_DT_BYTES) {
        if (n > t->data_len / 4) { *err_off = need; return MIP_E_VALUE; }
    } else {
        uint64_t isz = mip_dtype_size[t->dtype];
        if (n > t->data_len / isz || n * isz != t->data_len) {
            *err_off = need; return MIP_E_VALUE;
        }
    }
    return MIP_OK;
}

/* Padding that puts data written at frame offset `off` on an 8-octet boundary. */
static inline unsigned mip_tensor_pad(size_t off) {
    return (unsigned)((MIP_TENSOR_ALIGN - (off % MIP_TENSOR_ALIGN)) % MIP_TENSOR_ALIGN);
}

/* ---- MSIP header ---------------------------------------------------------- */
#define MSIP_HEADER_SIZE 24
#define MSIP_VERSION 1
#define MSIP_FRAME_TYPE_MAX 10
#define MSIP_MSG_KIND_MAX 5

typedef struct {
    uint8_t version;
    uint8_t flags;
    uint16_t frame_type;
    uint16_t msg_kind;
    uint16_t reserved;
    uint32_t payload_len;
    uint64_t msg_id;
} msip_header;

static inline int msip_parse_header(const unsigned char *p, size_t len,
                                    uint64_t max_payload, msip_header *h,
                                    size_t *err_off) {
    *h = (msip_header){0};  /* every field defined on every return */
    if (len < MSIP_HEADER_SIZE) return MIP_NEED_MORE;
    if (p[0] != 'M' || p[1] != 'S' || p[2] != 'I' || p[3] != 'P') {
        *err_off = 0; return MIP_E_MAGIC;
    }
    h->version = p[4];
    h->flags = p[5];
    h->frame_type = mip_load_be16(p + 6);
    h->msg_kind = mip_load_be16(p + 8);
    h->reserved = mip_load_be16(p + 10);
    h->payload_len = mip_load_be32(p + 12);
    h->msg_id = mip_load_be64(p + 16);
    if (h->version != MSIP_VERSION) { *err_off = 4; return MIP_E_VERSION; }
    if (h->frame_type == 0 || h->frame_type > MSIP_FRAME_TYPE_MAX) {
        *err_off = 6; return MIP_E_FRAME_TYPE;
    }
    if (h->msg_kind == 0 || h->msg_kind > MSIP_MSG_KIND_MAX) {
        *err_off = 8; return MIP_E_MSG_KIND;
    }
    if ((uint64_t)h->payload_len > max_payload) { *err_off = 12; return MIP_E_TOO_LARGE; }
    return MIP_OK;
}

static inline void msip_write_header(unsigned char *p, uint8_t flags,
                                     uint16_t frame_type, uint16_t msg_kind,
                                     uint32_t payload_len, uint64_t msg_id) {
    p[0] = 'M'; p[1] = 'S'; p[2] = 'I'; p[3] = 'P';
    p[4] = MSIP_VERSION;
    p[5] = flags;
    mip_store_be16(p + 6, frame_type);
    mip_store_be16(p + 8, msg_kind);
    p[10] = 0; p[11] = 0;
    mip_store_be32(p + 12, payload_len);
    mip_store_be64(p + 16, msg_id);
}

#endif /* MIP_WIRE_H */
