/* Optional C versions of the reader's two hot loops over a snapshot segment,
 * of the writer's snapshot build, and of its decoding of etcd's range answers.
 *
 * shmcache/snapshot.py holds the reference implementation in pure Python and
 * uses these only when the extension was built (it is optional at install
 * time). Both must behave identically: tests/test_snapshot.py runs the same
 * cases through both, and tests/test_fuzz.py feeds both damaged segments.
 *
 * The segment is untrusted input: every offset and length read from it is
 * checked against the buffer before use, all arithmetic is done in 64-bit
 * unsigned integers that cannot overflow for lengths bounded by the buffer,
 * and corruption raises ValueError (snapshot.py and indexseg.py turn it into
 * CorruptSegmentError with the segment's name; the hash lookups, which the
 * reader calls directly, raise CorruptSegmentError naming their segment
 * themselves: named_damage). Every key a read compares is in an entry whose
 * checksum was verified first (entry_check). The layout is little-endian;
 * so is every host this builds on (checked below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmcache's segment format is little-endian; this host is not"
#endif

#define ENTRY_SIZE 48u
#define CONTROL_SEQ_OFF 16u /* layout.C_SEQ; the module exports it and a test compares */

static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static int64_t rds64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }

/* CRC-32 (zlib's, IEEE 802.3 reflected) continued from ``c``, by zlib. */
static uint32_t crc_zlib(uint32_t c, const unsigned char *p, uint64_t n) {
    uLong v = c;
    while (n > 0) { /* zlib takes uInt lengths */
        uInt chunk = n > 0x40000000u ? 0x40000000u : (uInt)n;
        v = crc32(v, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)v;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_CLMUL_CRC 1
/* The same CRC-32 by carry-less multiplication (PCLMULQDQ), folding 64 then 16
 * bytes at a time: "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
 * Instruction" (Gopal et al., Intel, 2009), with the reflected CRC-32 constants
 * that Linux (arch/x86/crypto/crc32-pclmul_asm.S) and Chromium's zlib use.
 * zlib's table-driven crc32 was more than half of what list() pays per entry
 * (the figures: docs/design.md, "The C speedups").
 * ``len`` is a multiple of 16 and at least 64; ``crc`` is the raw register (the
 * complement of the running CRC), as is the result. tests/test_snapshot.py
 * compares it with zlib.crc32 at every length and alignment up to 1 KiB. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_clmul_blocks(uint32_t crc, const unsigned char *buf, uint64_t len) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = k1k2;
    buf += 64;
    len -= 64;
    while (len >= 64) { /* fold four lanes of 16 bytes in parallel */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        len -= 64;
    }
    x0 = k3k4; /* fold the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (len >= 16) { /* then 16 bytes at a time */
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    /* 128 bits to 64, then Barrett reduction to 32 */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_srli_si128(x1, 8);
    x1 = _mm_xor_si128(x1, x2);
    x0 = k5k0;
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    x0 = poly;
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int clmul_ok = -1; /* -1: not asked yet */
#endif

/* CRC-32 of p[0, n) continued from c (c = 0 to start), as zlib.crc32(data, c). */
static uint32_t crc_from(uint32_t c, const unsigned char *p, uint64_t n) {
#ifdef HAVE_CLMUL_CRC
    if (n >= 64) {
        if (clmul_ok < 0) {
            __builtin_cpu_init();
            clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
        }
        if (clmul_ok) {
            uint64_t blocks = n & ~(uint64_t)15;
            c = ~crc_clmul_blocks(~c, p, blocks);
            p += blocks;
            n -= blocks;
        }
    }
#endif
    return n ? crc_zlib(c, p, n) : c;
}

static uint32_t crc(const unsigned char *p, uint64_t n) { return crc_from(0, p, n); }

/* crc32(data, value=0) -> int: zlib.crc32, as the reader computes it (tests compare). */
static PyObject *py_crc32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32() takes data and an optional start value");
        return NULL;
    }
    uint32_t start = 0;
    if (nargs == 2) {
        unsigned long v = PyLong_AsUnsignedLongMask(args[1]);
        if (PyErr_Occurred()) return NULL;
        start = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t c = crc_from(start, (const unsigned char *)view.buf, (uint64_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

static PyObject *corrupt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(PyExc_ValueError, fmt, ap);
    va_end(ap);
    return NULL;
}

/* shmcache.errors.CorruptSegmentError, taken at import. */
static PyObject *CorruptSegmentError;

/* The pending ValueError (damage a lookup found) as CorruptSegmentError naming
 * ``segment``, as Snapshot._corrupt makes it: a lookup in the delta segment
 * reports the delta segment, one in the snapshot the snapshot, whoever called.
 * Any other exception passes unchanged. Returns NULL. */
static PyObject *named_damage(PyObject *segment) {
    if (!PyErr_ExceptionMatches(PyExc_ValueError) || PyErr_ExceptionMatches(CorruptSegmentError))
        return NULL;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject *msg = v != NULL ? PyObject_Str(v) : NULL;
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    if (msg == NULL) return NULL;
    PyObject *args = PyTuple_Pack(1, msg);
    PyObject *kw = Py_BuildValue("{sO}", "segment", segment);
    PyObject *exc = args != NULL && kw != NULL ? PyObject_Call(CorruptSegmentError, args, kw) : NULL;
    if (exc != NULL) PyErr_SetObject(CorruptSegmentError, exc);
    Py_XDECREF(exc);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_DECREF(msg);
    return NULL;
}

/* A KeyValue (a tuple subclass) from an entry already validated. */
static PyObject *make_kv(PyTypeObject *kvtype, PyObject *key, const unsigned char *e,
                         const unsigned char *value, uint64_t vlen) {
    PyObject *kv = kvtype->tp_alloc(kvtype, 6);
    if (kv == NULL) return NULL;
    PyObject *items[5];
    items[0] = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)vlen);
    items[1] = PyLong_FromLongLong(rds64(e + 16));
    items[2] = PyLong_FromLongLong(rds64(e + 24));
    items[3] = PyLong_FromLongLong(rds64(e + 32));
    items[4] = PyLong_FromLongLong(rds64(e + 40));
    for (int j = 0; j < 5; j++) {
        if (items[j] == NULL) {
            for (int k = 0; k < 5; k++) Py_XDECREF(items[k]);
            Py_DECREF(kv);
            return NULL;
        }
    }
    Py_INCREF(key);
    PyTuple_SET_ITEM(kv, 0, key);
    for (int j = 0; j < 5; j++) PyTuple_SET_ITEM(kv, j + 1, items[j]);
    return kv;
}

/* get(key, params) -> KeyValue | None, where params is the tuple
 * (buf, hash_off, slots, data_off, data_end, kvtype, segment name) a Snapshot
 * prepares once: one tuple instead of seven arguments keeps the reader's per-call
 * cost down. Damage raises CorruptSegmentError naming the segment. */
#define PARAMS_LEN 7
static PyObject *get_impl(PyObject *const *fargs);

static PyObject *get_impl_flags(PyObject *const *fargs, int keys_only);

/* get(key, params[, keys_only]): keys_only true gives the KeyValue with an empty value
 * (the entry is still verified by its checksum; its value is not copied). */
static PyObject *snapshot_get(PyObject *self, PyObject *const *fargs, Py_ssize_t nargs) {
    if ((nargs != 2 && nargs != 3) || !PyTuple_Check(fargs[1])
        || PyTuple_GET_SIZE(fargs[1]) != PARAMS_LEN) {
        PyErr_SetString(PyExc_TypeError, "get() takes a key and a 7-tuple of parameters");
        return NULL;
    }
    int keys_only = nargs == 3 ? PyObject_IsTrue(fargs[2]) : 0;
    if (keys_only < 0) return NULL;
    return get_impl_flags(fargs, keys_only);
}

/* reader_get(key, state) -> KeyValue | None | state[6]
 *
 * Reader.get's common case in one call: state is the tuple
 * (control mmap, seq, stuck_seq, prefix, recent, params, SLOW, delta_params) that
 * the Reader rebuilds whenever its view changes. The key is looked up in the
 * recent changes (a dict), then in the delta segment (delta_params, or None
 * without one; an entry of version 0 there is a deletion), then in the
 * snapshot. Returns SLOW (the sentinel) whenever the
 * Reader must do more than answer from its current view: a key that is not
 * exactly bytes or is outside the prefix, a control segment whose SEQ moved
 * (the writer published), or a closed mapping. The view is the state's own,
 * so a concurrent refresh in another thread cannot mix two views.
 */
static PyObject *reader_get(PyObject *self, PyObject *const *fargs, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(fargs[1]) || PyTuple_GET_SIZE(fargs[1]) != 8) {
        PyErr_SetString(PyExc_TypeError, "reader_get() takes a key and an 8-tuple");
        return NULL;
    }
    PyObject *key = fargs[0], *st = fargs[1];
    PyObject *slow = PyTuple_GET_ITEM(st, 6);
    if (!PyBytes_CheckExact(key)) return Py_NewRef(slow);
    Py_buffer ctl;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(st, 0), &ctl, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* closed: the slow path says so properly */
        return Py_NewRef(slow);
    }
    uint64_t seq = (uint64_t)ctl.len >= CONTROL_SEQ_OFF + 8
                       ? rd64((const unsigned char *)ctl.buf + CONTROL_SEQ_OFF) : 0;
    PyBuffer_Release(&ctl);
    /* -1 (nothing seen yet) never equals a SEQ, which stays below 2**63. */
    long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(st, 1));
    long long stuck = PyLong_AsLongLong(PyTuple_GET_ITEM(st, 2));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return Py_NewRef(slow);
    }
    if ((long long)seq != want && (long long)seq != stuck) return Py_NewRef(slow);
    PyObject *prefix = PyTuple_GET_ITEM(st, 3);
    if (!PyBytes_Check(prefix)) return Py_NewRef(slow);
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
    if (plen > PyBytes_GET_SIZE(key)
        || memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(prefix), (size_t)plen) != 0)
        return Py_NewRef(slow);
    PyObject *recent = PyTuple_GET_ITEM(st, 4);
    if (!PyDict_Check(recent)) return Py_NewRef(slow);
    PyObject *hit = PyDict_GetItemWithError(recent, key);
    if (hit != NULL) return Py_NewRef(hit);
    if (PyErr_Occurred()) return NULL;
    PyObject *ovl = PyTuple_GET_ITEM(st, 7);
    if (ovl != Py_None) {
        if (!PyTuple_Check(ovl) || PyTuple_GET_SIZE(ovl) != PARAMS_LEN) return Py_NewRef(slow);
        PyObject *oargs[2] = {key, ovl};
        PyObject *changed = get_impl(oargs);
        if (changed != Py_None) {
            if (changed == NULL) return NULL;
            /* KeyValue(key, value, create, mod, version, lease): version 0 = deleted */
            if (PyLong_AsLongLong(PyTuple_GET_ITEM(changed, 4)) == 0) {
                Py_DECREF(changed);
                if (PyErr_Occurred()) return NULL;
                Py_RETURN_NONE;
            }
            return changed;
        }
        Py_DECREF(changed);
    }
    PyObject *params = PyTuple_GET_ITEM(st, 5);
    if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != PARAMS_LEN) return Py_NewRef(slow);
    PyObject *gargs[2] = {key, params};
    return get_impl(gargs);
}

typedef struct {
    const unsigned char *buf;
    uint64_t size, hash_off, slots, data_off, data_end;
    PyTypeObject *kvtype;
    int keys_only; /* KeyValues with empty values (the value is not copied) */
} geom_t;

/* Parse (buf, hash_off, slots, data_off, data_end, kvtype, name) and take the buffer. */
static int geom_open(PyObject *params, geom_t *g, Py_buffer *view) {
    PyObject *args[6];
    for (int j = 0; j < 6; j++) args[j] = PyTuple_GET_ITEM(params, j);
    g->hash_off = PyLong_AsUnsignedLongLong(args[1]);
    g->slots = PyLong_AsUnsignedLongLong(args[2]);
    g->data_off = PyLong_AsUnsignedLongLong(args[3]);
    g->data_end = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred()) return -1;
    if (!PyType_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "kvtype must be a type");
        return -1;
    }
    g->kvtype = (PyTypeObject *)args[5];
    g->keys_only = 0;
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0) return -1;
    g->buf = (const unsigned char *)view->buf;
    g->size = (uint64_t)view->len;
    if (g->slots == 0 || (g->slots & (g->slots - 1)) || g->hash_off > g->size
        || g->slots > (g->size - g->hash_off) / 16 || g->data_end > g->size
        || g->data_off > g->data_end) {
        corrupt("snapshot geometry out of bounds (slots %llu, data end %llu)",
                (unsigned long long)g->slots, (unsigned long long)g->data_end);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The entry at ``off`` in the data area [data_off, data_end), after its bounds and its
 * checksum: 0 with its key length and end (``stop``: before the padding) set, or -1
 * with ValueError set. Every key a read compares is read through here first, so a
 * damaged key is an error, never a wrong turn of a comparison. */
static int entry_check(const unsigned char *buf, uint64_t data_off, uint64_t data_end,
                       uint64_t off, uint64_t *klen, uint64_t *stop) {
    if (data_end - data_off < ENTRY_SIZE || off < data_off || off > data_end - ENTRY_SIZE
        || (off & 7)) {
        corrupt("entry offset %llu outside the data area", (unsigned long long)off);
        return -1;
    }
    const unsigned char *e = buf + off;
    uint64_t kl = rd32(e + 4), vl = rd32(e + 8);
    uint64_t end = off + ENTRY_SIZE + kl + vl; /* < 2**65: no wrap in u64 */
    if (end > data_end) {
        corrupt("entry at %llu claims %llu+%llu bytes past the data area",
                (unsigned long long)off, (unsigned long long)kl, (unsigned long long)vl);
        return -1;
    }
    if (crc(e + 4, end - off - 4) != rd32(e)) {
        corrupt("entry at %llu fails its checksum", (unsigned long long)off);
        return -1;
    }
    *klen = kl;
    *stop = end;
    return 0;
}

/* The entry of ``key`` (a bytes object) as a new KeyValue, Py_None (new ref) or NULL. */
static PyObject *lookup_hashed(const geom_t *g, PyObject *key, uint32_t h) {
    const unsigned char *buf = g->buf;
    uint64_t hash_off = g->hash_off, slots = g->slots, data_off = g->data_off,
             data_end = g->data_end;
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(key);
    uint64_t klen_want = (uint64_t)PyBytes_GET_SIZE(key);
    uint64_t mask = slots - 1;
    uint64_t i = h & mask;
    for (uint64_t n = 0; n < slots; n++) {
        const unsigned char *slot = buf + hash_off + 16 * i;
        uint64_t word = rd64(slot), off = rd64(slot + 8);
        if (off == 0) {
            if (word != 0)
                return corrupt("hash slot %llu is damaged (empty with a hash)",
                               (unsigned long long)i);
            Py_INCREF(Py_None);
            return Py_None;
        }
        uint32_t sh = (uint32_t)word;
        uint32_t check = (sh ^ (uint32_t)off ^ (uint32_t)(off >> 32) ^ 0x5BD1E995u) * 0x9E3779B1u;
        if ((uint32_t)(word >> 32) != check)
            return corrupt("hash slot %llu fails its check", (unsigned long long)i);
        if (sh == h) {
            if (data_end - data_off < ENTRY_SIZE || off < data_off
                || off > data_end - ENTRY_SIZE || (off & 7))
                return corrupt("hash slot %llu points outside the data area (%llu)",
                               (unsigned long long)i, (unsigned long long)off);
            /* The entry's checksum before its key is compared: a damaged key that no
             * longer equals ``key`` is an error, not a miss. (A key with the same
             * hash, a real collision, passes and the probe goes on: a rare CRC.) */
            uint64_t klen, stop;
            if (entry_check(buf, data_off, data_end, off, &klen, &stop) < 0) return NULL;
            const unsigned char *e = buf + off;
            if (klen == klen_want && memcmp(e + ENTRY_SIZE, k, klen) == 0)
                return make_kv(g->kvtype, key, e, e + ENTRY_SIZE + klen,
                               g->keys_only ? 0 : stop - off - ENTRY_SIZE - klen);
        }
        i = (i + 1) & mask;
    }
    return corrupt("hash table has no empty slot");
}

/* The snapshot hashes a key by its CRC-32 (zlib's). */
static PyObject *lookup(const geom_t *g, PyObject *key) {
    return lookup_hashed(g, key, crc((const unsigned char *)PyBytes_AS_STRING(key),
                                     (uint64_t)PyBytes_GET_SIZE(key)));
}

static PyObject *get_impl(PyObject *const *fargs) {
    return get_impl_flags(fargs, 0);
}

static PyObject *get_impl_flags(PyObject *const *fargs, int keys_only) {
    PyObject *key = fargs[0];
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes");
        return NULL;
    }
    geom_t g;
    Py_buffer view;
    PyObject *segment = PyTuple_GET_ITEM(fargs[1], PARAMS_LEN - 1);
    if (geom_open(fargs[1], &g, &view) < 0) return named_damage(segment);
    g.keys_only = keys_only;
    PyObject *result = lookup(&g, key);
    PyBuffer_Release(&view);
    if (result == NULL) named_damage(segment);
    return result;
}

/* present(keys, params) -> int: how many of ``keys`` (a list of bytes) the snapshot
 * holds, each found by get()'s verified probe (the entry's checksum before its key is
 * compared); no value is copied. Reader.count's check of the keys changed since the
 * snapshot, in one call. */
static PyObject *snapshot_present(PyObject *self, PyObject *const *fargs, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(fargs[0]) || !PyTuple_Check(fargs[1])
        || PyTuple_GET_SIZE(fargs[1]) != PARAMS_LEN) {
        PyErr_SetString(PyExc_TypeError, "present() takes a list of keys and a 7-tuple");
        return NULL;
    }
    geom_t g;
    Py_buffer view;
    PyObject *segment = PyTuple_GET_ITEM(fargs[1], PARAMS_LEN - 1);
    if (geom_open(fargs[1], &g, &view) < 0) return named_damage(segment);
    g.keys_only = 1;
    Py_ssize_t found = 0;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(fargs[0]); j++) {
        PyObject *key = PyList_GET_ITEM(fargs[0], j);
        if (!PyBytes_Check(key)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            return NULL;
        }
        PyObject *kv = lookup(&g, key);
        if (kv == NULL) {
            PyBuffer_Release(&view);
            return named_damage(segment);
        }
        found += kv != Py_None;
        Py_DECREF(kv);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

/* Lexicographic comparison of two byte strings, like bytes' < / ==. */
static int bcmp3(const unsigned char *a, uint64_t alen, const unsigned char *b, uint64_t blen) {
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c) return c;
    return alen < blen ? -1 : (alen > blen ? 1 : 0);
}

/* Entries i, i+1, ... of a snapshot mapped at buf (size bytes) in index order,
 * appended to out while key < end (end None: no bound) and fewer than limit (-1:
 * no limit) were taken. Entry i must start at `expected` and each following one
 * right after the previous (build() lays them out back to back in key order); each
 * passes its checksum before its key is compared; keys must strictly increase from
 * `prev` (NULL: entry i is the first) and entry i's must be >= `start` (where the
 * search put it); a walk that runs out of entries must end at data_end. Returns -1
 * with an exception set on damage or failure. keys_only: KeyValues with empty values
 * (each entry is still verified, its value not copied); shard_n > 0: only the keys
 * with crc32(key) % shard_n == shard_i are taken (the others are verified and passed
 * over, and do not count towards limit). */
static int walk_into(PyObject *out, const unsigned char *buf, uint64_t size, uint64_t index_off,
                     uint64_t i, uint64_t count, uint64_t expected, uint64_t data_end,
                     const unsigned char *start, uint64_t slen, const unsigned char *prev,
                     uint64_t prev_len, PyObject *end, long long limit, PyTypeObject *kvtype,
                     int keys_only, uint64_t shard_i, uint64_t shard_n) {
    if (data_end > size || index_off > size || count > (size - index_off) / 8) {
        corrupt("snapshot geometry out of bounds (count %llu, data end %llu)",
                (unsigned long long)count, (unsigned long long)data_end);
        return -1;
    }
    uint64_t first = i;
    for (; i < count && (limit < 0 || (long long)PyList_GET_SIZE(out) < limit); i++) {
        uint64_t off = rd64(buf + index_off + 8 * i);
        if (off != expected) {
            corrupt("sorted index is out of order: entry %llu points at %llu, expected %llu",
                    (unsigned long long)i, (unsigned long long)off,
                    (unsigned long long)expected);
            return -1;
        }
        uint64_t klen, stop;
        if (entry_check(buf, 0, data_end, off, &klen, &stop) < 0) return -1;
        const unsigned char *e = buf + off;
        const unsigned char *k = e + ENTRY_SIZE;
        if ((prev != NULL && bcmp3(k, klen, prev, prev_len) <= 0)
            || (i == first && bcmp3(k, klen, start, slen) < 0)) {
            corrupt("sorted index is out of order at entry %llu", (unsigned long long)i);
            return -1;
        }
        prev = k;
        prev_len = klen;
        expected = (stop + 7) & ~(uint64_t)7;
        if (end != Py_None && bcmp3(k, klen, (const unsigned char *)PyBytes_AS_STRING(end),
                                    (uint64_t)PyBytes_GET_SIZE(end)) >= 0)
            return 0;
        if (shard_n && crc(k, klen) % shard_n != shard_i) continue;
        PyObject *key = PyBytes_FromStringAndSize((const char *)k, (Py_ssize_t)klen);
        if (key == NULL) return -1;
        PyObject *kv = make_kv(kvtype, key, e, k + klen,
                               keys_only ? 0 : stop - off - ENTRY_SIZE - klen);
        Py_DECREF(key);
        if (kv == NULL) return -1;
        int rc = PyList_Append(out, kv);
        Py_DECREF(kv);
        if (rc < 0) return -1;
    }
    if (i == count && expected != data_end) {
        corrupt("sorted index ends at %llu, before the data area's end %llu",
                (unsigned long long)expected, (unsigned long long)data_end);
        return -1;
    }
    return 0;
}

/* An index value entry's check word (indexseg.value_check): the CRC-32 of its fields
 * packed as "<QIQQ" (offset, length, first posting, count), continued over its bytes. */
static uint32_t value_check(uint64_t voff, uint32_t vlen, uint64_t first, uint64_t count,
                            const unsigned char *value) {
    unsigned char packed[28];
    memcpy(packed, &voff, 8);
    memcpy(packed + 8, &vlen, 4);
    memcpy(packed + 12, &first, 8);
    memcpy(packed + 20, &count, 8);
    return crc_from(crc(packed, 28), value, vlen);
}

/* index_run(buf, vtab_off, nvals, posts_off, npost, values_off, values_end, keys_off,
 *           keys_end, value, after, limit[, skip, snap]) -> list of bytes | of KeyValue
 *
 * by_index's read of an index segment in one call (indexseg.IndexSegment.run_keys and
 * run_items are the reference): a binary search of the index's value table for
 * ``value`` (each entry read is bounded and checked against its check word), then of
 * its run of postings for the first key above ``after`` (None: from the start), then
 * at most ``limit`` keys (-1: all), each checked against its posting's CRC and for
 * strictly increasing order. [] if the value has no keys.
 *
 * With ``snap`` (a snapshot's 7-tuple of get() parameters), the keys' KeyValues from
 * that snapshot instead, probed with the posting's CRC as the hash (the snapshot
 * hashes keys by the same CRC); keys in the dict ``skip`` (the changes since the
 * snapshot) are passed over and do not count towards ``limit``. A key the snapshot
 * lacks is damage: ValueError starting "missing:"; a snapshot's own damage is
 * CorruptSegmentError naming the snapshot.
 */
#define INDEX_BATCH 32

static PyObject *index_run(PyObject *self, PyObject *const *a, Py_ssize_t nargs) {
    if ((nargs != 12 && nargs != 14 && nargs != 15) || !PyBytes_Check(a[9])
        || (a[10] != Py_None && !PyBytes_Check(a[10]))
        || (nargs >= 14 && ((a[12] != Py_None && !PyDict_Check(a[12]))
                            || (a[13] != Py_None && (!PyTuple_Check(a[13])
                                                     || PyTuple_GET_SIZE(a[13]) != PARAMS_LEN))))) {
        PyErr_SetString(PyExc_TypeError, "index_run() takes 12, 14 or 15 arguments");
        return NULL;
    }
    PyObject *batch[INDEX_BATCH];
    uint32_t hashes[INDEX_BATCH];
    int nb = 0;
    PyObject *skip = nargs >= 14 && a[12] != Py_None ? a[12] : NULL;
    PyObject *snapp = nargs >= 14 && a[13] != Py_None ? a[13] : NULL;
    int keys_only = nargs == 15 ? PyObject_IsTrue(a[14]) : 0;
    if (keys_only < 0) return NULL;
    geom_t sg;
    Py_buffer sview;
    if (snapp != NULL && geom_open(snapp, &sg, &sview) < 0)
        return named_damage(PyTuple_GET_ITEM(snapp, PARAMS_LEN - 1));
    if (snapp != NULL) sg.keys_only = keys_only;
    uint64_t g[8];
    for (int j = 0; j < 8; j++) g[j] = PyLong_AsUnsignedLongLong(a[j + 1]);
    long long limit = PyLong_AsLongLong(a[11]);
    if (PyErr_Occurred()) return NULL;
    uint64_t vtab = g[0], nvals = g[1], posts = g[2], npost = g[3], voff = g[4], vend = g[5],
             koff = g[6], kend = g[7];
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        if (snapp != NULL) PyBuffer_Release(&sview);
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    uint64_t size = (uint64_t)view.len;
    const unsigned char *want = (const unsigned char *)PyBytes_AS_STRING(a[9]);
    uint64_t wlen = (uint64_t)PyBytes_GET_SIZE(a[9]);
    PyObject *out = NULL;
    if (vtab > size || nvals > (size - vtab) / 32 || posts > size || npost > (size - posts) / 16
        || voff > vend || vend > size || koff > kend || kend > size) {
        corrupt("index segment geometry out of bounds");
        goto done;
    }
    uint64_t lo = 0, hi = nvals, first = 0, count = 0;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        const unsigned char *e = buf + vtab + 32 * mid;
        uint64_t off = rd64(e), f = rd64(e + 16), n = rd64(e + 24);
        uint32_t vlen = rd32(e + 8), check = rd32(e + 12);
        if (off > vend - voff || vlen > vend - voff - off || f > npost || n > npost - f
            || n == 0) {
            corrupt("index value %llu points outside the segment", (unsigned long long)mid);
            goto done;
        }
        const unsigned char *v = buf + voff + off;
        if (value_check(off, vlen, f, n, v) != check) {
            corrupt("index value %llu fails its check", (unsigned long long)mid);
            goto done;
        }
        int c = bcmp3(v, vlen, want, wlen);
        if (c < 0) {
            lo = mid + 1;
        } else if (c > 0) {
            hi = mid;
        } else {
            first = f;
            count = n;
            break;
        }
    }
    out = PyList_New(0);
    if (out == NULL || count == 0) goto done;
    uint64_t p = first, end = first + count;
#define POST_KEY(idx, kp, kl)                                                                 \
    do {                                                                                      \
        const unsigned char *pe = buf + posts + 16 * (idx);                                   \
        uint64_t o = rd64(pe);                                                                \
        kl = rd32(pe + 8);                                                                    \
        if (o > kend - koff || kl > kend - koff - o) {                                        \
            corrupt("index posting %llu points outside the key area", (unsigned long long)(idx)); \
            goto fail;                                                                        \
        }                                                                                     \
        kp = buf + koff + o;                                                                  \
        if (crc(kp, kl) != rd32(pe + 12)) {                                                   \
            corrupt("index posting %llu or its key fails its checksum", (unsigned long long)(idx)); \
            goto fail;                                                                        \
        }                                                                                     \
    } while (0)
    const unsigned char *kp;
    uint64_t kl;
    if (a[10] != Py_None) {
        const unsigned char *af = (const unsigned char *)PyBytes_AS_STRING(a[10]);
        uint64_t alen = (uint64_t)PyBytes_GET_SIZE(a[10]);
        uint64_t l2 = p, h2 = end;
        while (l2 < h2) {
            uint64_t mid = l2 + (h2 - l2) / 2;
            POST_KEY(mid, kp, kl);
            if (bcmp3(kp, kl, af, alen) <= 0)
                l2 = mid + 1;
            else
                h2 = mid;
        }
        p = l2;
    }
    const unsigned char *prev = NULL;
    uint64_t prevlen = 0;
    if (a[10] != Py_None) {
        prev = (const unsigned char *)PyBytes_AS_STRING(a[10]);
        prevlen = (uint64_t)PyBytes_GET_SIZE(a[10]);
    }
    /* With a snapshot, keys are probed in batches: first every key's hash slot is
     * prefetched, then every candidate entry, then each is looked up for real. The
     * run's keys are scattered over the snapshot, so each lookup would otherwise
     * wait for two cache misses in turn; batched, the misses overlap. (Prefetches
     * are hints only: the lookup checks everything itself.) */
    for (;;) {
        int more = p < end && (limit < 0 || (long long)PyList_GET_SIZE(out) + nb < limit);
        if (more) {
            POST_KEY(p, kp, kl);
            if (prev != NULL && bcmp3(prev, prevlen, kp, kl) >= 0) {
                corrupt("index run is out of key order at posting %llu", (unsigned long long)p);
                goto fail;
            }
            prev = kp;
            prevlen = kl;
            PyObject *k = PyBytes_FromStringAndSize((const char *)kp, (Py_ssize_t)kl);
            if (k == NULL) goto fail;
            uint32_t h = rd32(buf + posts + 16 * p + 12);
            p++;
            if (snapp == NULL) {
                int rc = PyList_Append(out, k);
                Py_DECREF(k);
                if (rc < 0) goto fail;
                continue;
            }
            int skipped = skip != NULL ? PyDict_Contains(skip, k) : 0;
            if (skipped != 0) {
                Py_DECREF(k);
                if (skipped < 0) goto fail;
                continue;
            }
            uint64_t slot = sg.hash_off + 16 * (h & (sg.slots - 1));
            __builtin_prefetch(sg.buf + slot);
            batch[nb] = k;
            hashes[nb++] = h;
            if (nb < INDEX_BATCH) continue;
        }
        if (nb == 0) break;
        for (int j = 0; j < nb; j++) { /* the first candidate entry of each key */
            const unsigned char *slot = sg.buf + sg.hash_off + 16 * (hashes[j] & (sg.slots - 1));
            uint64_t off = rd64(slot + 8);
            if ((uint32_t)rd64(slot) == hashes[j] && off >= sg.data_off) {
                /* the entry's first lines: header, key, and the value's start */
                for (uint64_t line = 0; line < 256 && off + line < sg.data_end; line += 64)
                    __builtin_prefetch(sg.buf + off + line);
            }
        }
        for (int j = 0; j < nb; j++) {
            PyObject *kv = lookup_hashed(&sg, batch[j], hashes[j]);
            if (kv == NULL || kv == Py_None) {
                if (kv == NULL) {
                    named_damage(PyTuple_GET_ITEM(snapp, PARAMS_LEN - 1));
                } else {
                    Py_DECREF(kv);
                    corrupt("missing: index posting of key %R names a key the snapshot lacks",
                            batch[j]);
                }
                for (int m = 0; m < nb; m++) Py_DECREF(batch[m]);
                nb = 0;
                goto fail;
            }
            int rc = PyList_Append(out, kv);
            Py_DECREF(kv);
            if (rc < 0) {
                for (int m = 0; m < nb; m++) Py_DECREF(batch[m]);
                nb = 0;
                goto fail;
            }
        }
        for (int m = 0; m < nb; m++) Py_DECREF(batch[m]);
        nb = 0;
        if (!more) break;
    }
    goto done;
fail:
    for (int m = 0; m < nb; m++) Py_DECREF(batch[m]);
    Py_CLEAR(out);
#undef POST_KEY
done:
    PyBuffer_Release(&view);
    if (snapp != NULL) PyBuffer_Release(&sview);
    return out;
}


/* Growable byte buffer for index_table. */
typedef struct { unsigned char *p; size_t len, cap; } gbuf_t;

static int gbuf_put(gbuf_t *g, const void *src, size_t n) {
    if (g->len + n > g->cap) {
        size_t cap = g->cap ? g->cap : 4096;
        while (cap < g->len + n) cap *= 2;
        unsigned char *q = PyMem_Realloc(g->p, cap);
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        g->p = q;
        g->cap = cap;
    }
    memcpy(g->p + g->len, src, n);
    g->len += n;
    return 0;
}

/* index_table(pairs, kbase, vbase) -> (value_table, postings, nvals, value_bytes, key_bytes)
 *
 * The per-posting part of indexseg.build for one index, which is the reference (and
 * the fallback without the speedups): ``pairs`` is a list of (value, key) bytes
 * tuples sorted by value then key. Each run of one value becomes a value entry
 * (offset kbase/vbase-relative as build() places them, length, check word, first
 * posting, count) and each key a posting (offset into the key bytes, length, CRC).
 * Bytes out, little-endian, in IDX_VALUE / IDX_POSTING layout.
 */
static PyObject *index_table(PyObject *self, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(a[0])) {
        PyErr_SetString(PyExc_TypeError, "index_table(pairs: list, kbase, vbase)");
        return NULL;
    }
    uint64_t kbase = PyLong_AsUnsignedLongLong(a[1]), vbase = PyLong_AsUnsignedLongLong(a[2]);
    if (PyErr_Occurred()) return NULL;
    PyObject *pairs = a[0];
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    gbuf_t vtab = {0}, posts = {0}, vb = {0}, kb = {0};
    PyObject *result = NULL;
    uint64_t nvals = 0, npost = 0;
    Py_ssize_t j = 0;
    while (j < n) {
        PyObject *first_pair = PyList_GET_ITEM(pairs, j);
        if (!PyTuple_Check(first_pair) || PyTuple_GET_SIZE(first_pair) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(first_pair, 0))) {
            PyErr_SetString(PyExc_TypeError, "pairs must be (bytes, bytes) tuples");
            goto done;
        }
        PyObject *value = PyTuple_GET_ITEM(first_pair, 0);
        const char *vp = PyBytes_AS_STRING(value);
        Py_ssize_t vl = PyBytes_GET_SIZE(value);
        uint64_t first = npost;
        for (; j < n; j++) {
            PyObject *pr = PyList_GET_ITEM(pairs, j);
            if (!PyTuple_Check(pr) || PyTuple_GET_SIZE(pr) != 2
                || !PyBytes_Check(PyTuple_GET_ITEM(pr, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(pr, 1))) {
                PyErr_SetString(PyExc_TypeError, "pairs must be (bytes, bytes) tuples");
                goto done;
            }
            PyObject *v = PyTuple_GET_ITEM(pr, 0);
            if (v != value && (PyBytes_GET_SIZE(v) != vl
                               || memcmp(PyBytes_AS_STRING(v), vp, (size_t)vl) != 0))
                break;
            PyObject *key = PyTuple_GET_ITEM(pr, 1);
            const unsigned char *kp = (const unsigned char *)PyBytes_AS_STRING(key);
            uint64_t kl = (uint64_t)PyBytes_GET_SIZE(key);
            if (kl > 0xFFFFFFFFu) {
                PyErr_SetString(PyExc_ValueError, "key too long");
                goto done;
            }
            uint64_t off = kbase + kb.len;
            uint32_t l32 = (uint32_t)kl, c32 = crc(kp, kl);
            unsigned char post[16];
            memcpy(post, &off, 8);
            memcpy(post + 8, &l32, 4);
            memcpy(post + 12, &c32, 4);
            if (gbuf_put(&posts, post, 16) < 0 || gbuf_put(&kb, kp, kl) < 0) goto done;
            npost++;
        }
        uint64_t count = npost - first, voff = vbase + vb.len;
        uint32_t vlen = (uint32_t)vl;
        uint32_t check = value_check(voff, vlen, first, count, (const unsigned char *)vp);
        unsigned char entry[32];
        memcpy(entry, &voff, 8);
        memcpy(entry + 8, &vlen, 4);
        memcpy(entry + 12, &check, 4);
        memcpy(entry + 16, &first, 8);
        memcpy(entry + 24, &count, 8);
        if (gbuf_put(&vtab, entry, 32) < 0 || gbuf_put(&vb, vp, (size_t)vl) < 0) goto done;
        nvals++;
    }
    result = Py_BuildValue("(y#y#Ky#y#)", vtab.p ? (const char *)vtab.p : "", (Py_ssize_t)vtab.len,
                           posts.p ? (const char *)posts.p : "", (Py_ssize_t)posts.len,
                           (unsigned long long)nvals, vb.p ? (const char *)vb.p : "",
                           (Py_ssize_t)vb.len, kb.p ? (const char *)kb.p : "", (Py_ssize_t)kb.len);
done:
    PyMem_Free(vtab.p);
    PyMem_Free(posts.p);
    PyMem_Free(vb.p);
    PyMem_Free(kb.p);
    return result;
}

/* range(buf, index_off, count, data_off, data_end, start, end, limit, kvtype
 *       [, keys_only, shard_i, shard_n]) -> list
 *
 * list()'s snapshot part in one call: a binary search of the sorted index for the
 * first key >= start (every entry it reads bounds-checked), the offset that entry
 * must have (right after entry i-1, or data_off), then walk_into() from there.
 */
static PyObject *snapshot_range(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 9 && nargs != 12) || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "range() takes 9 or 12 arguments, start bytes");
        return NULL;
    }
    int keys_only = nargs == 12 ? PyObject_IsTrue(args[9]) : 0;
    if (keys_only < 0) return NULL;
    uint64_t shard_i = nargs == 12 ? PyLong_AsUnsignedLongLong(args[10]) : 0;
    uint64_t shard_n = nargs == 12 ? PyLong_AsUnsignedLongLong(args[11]) : 0;
    uint64_t index_off = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t count = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t data_off = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t data_end = PyLong_AsUnsignedLongLong(args[4]);
    long long limit = PyLong_AsLongLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    PyObject *end = args[6];
    if ((end != Py_None && !PyBytes_Check(end)) || !PyType_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "end must be bytes or None, kvtype a type");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    uint64_t size = (uint64_t)view.len;
    const unsigned char *start = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    uint64_t slen = (uint64_t)PyBytes_GET_SIZE(args[5]);
    PyObject *out = NULL;
    if (data_end > size || data_off > data_end || index_off > size
        || count > (size - index_off) / 8 || data_end - data_off < ENTRY_SIZE * (count ? 1 : 0)) {
        corrupt("snapshot geometry out of bounds (count %llu, data end %llu)",
                (unsigned long long)count, (unsigned long long)data_end);
        goto done;
    }
    uint64_t lo = 0, hi = count;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        uint64_t off = rd64(buf + index_off + 8 * mid);
        if (off < data_off || off > data_end - ENTRY_SIZE) {
            corrupt("sorted index entry %llu points outside the data area",
                    (unsigned long long)mid);
            goto done;
        }
        uint64_t klen = rd32(buf + off + 4);
        if (klen > data_end - off - ENTRY_SIZE) {
            corrupt("entry at %llu claims a key past the data area", (unsigned long long)off);
            goto done;
        }
        if (bcmp3(buf + off + ENTRY_SIZE, klen, start, slen) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    /* The search compared keys it did not verify (a checksum per step would cost an
     * entry's CRC, value included, at each of ~log2(count) steps). Its answer is
     * verified instead: entry lo-1 passes its checksum and its key is below start,
     * and walk_into checks that entry lo follows it, passes its own and is not below
     * start (or that lo-1 is the last entry). A damaged key or index entry on the
     * way can misdirect the search, never the listing. */
    uint64_t expected = data_off;
    const unsigned char *prev = NULL;
    uint64_t prev_len = 0;
    if (lo > 0) {
        uint64_t poff = rd64(buf + index_off + 8 * (lo - 1)), stop;
        if (entry_check(buf, data_off, data_end, poff, &prev_len, &stop) < 0) goto done;
        prev = buf + poff + ENTRY_SIZE;
        if (bcmp3(prev, prev_len, start, slen) >= 0) {
            corrupt("sorted index is out of order: the search ended after entry %llu, "
                    "whose key is not below its start", (unsigned long long)(lo - 1));
            goto done;
        }
        expected = (stop + 7) & ~(uint64_t)7;
    }
    out = PyList_New(0);
    if (out != NULL && walk_into(out, buf, size, index_off, lo, count, expected, data_end,
                                 start, slen, prev, prev_len, end, limit,
                                 (PyTypeObject *)args[8], keys_only, shard_i, shard_n) < 0)
        Py_CLEAR(out);
done:
    PyBuffer_Release(&view);
    return out;
}


/* -- the writer's snapshot build ------------------------------------------------------ */

typedef struct {
    const unsigned char *key, *value;
    uint64_t klen, vlen;
    int64_t meta[4]; /* create, mod, version, lease */
    int deleted;
} change_t;

static uint64_t entry_span(uint64_t klen, uint64_t vlen) {
    return (ENTRY_SIZE + klen + vlen + 7) & ~(uint64_t)7;
}

typedef struct {
    unsigned char *out;
    uint64_t index_off, hash_off, slots, data_off, data_end, count;
    uint64_t n, pos;
    char err[200];
} sink_t;

/* Append one finished entry (already at out + pos) to the index and the hash table. */
static int sink_index(sink_t *s, uint64_t span) {
    const unsigned char *e = s->out + s->pos;
    uint64_t klen = rd32(e + 4);
    uint32_t h = crc(e + ENTRY_SIZE, klen);
    uint64_t off = s->pos, mask = s->slots - 1, i = h & mask;
    memcpy(s->out + s->index_off + 8 * s->n, &off, 8);
    for (uint64_t tries = 0; rd64(s->out + s->hash_off + 16 * i + 8) != 0; tries++) {
        if (tries >= s->slots) {
            snprintf(s->err, sizeof s->err, "hash table full");
            return -1;
        }
        i = (i + 1) & mask;
    }
    uint32_t check = (h ^ (uint32_t)off ^ (uint32_t)(off >> 32) ^ 0x5BD1E995u) * 0x9E3779B1u;
    uint64_t word = (uint64_t)h | ((uint64_t)check << 32);
    memcpy(s->out + s->hash_off + 16 * i, &word, 8);
    memcpy(s->out + s->hash_off + 16 * i + 8, &off, 8);
    s->n++;
    s->pos += span;
    return 0;
}

static int sink_room(sink_t *s, uint64_t span) {
    if (s->n >= s->count || span > s->data_end - s->pos) {
        snprintf(s->err, sizeof s->err,
                 "the entries outgrow the planned snapshot (%llu entries, %llu bytes planned)",
                 (unsigned long long)s->count,
                 (unsigned long long)(s->data_end - s->data_off));
        return -1;
    }
    return 0;
}

static int sink_new(sink_t *s, const change_t *c) {
    uint64_t span = entry_span(c->klen, c->vlen);
    if (sink_room(s, span) < 0) return -1;
    unsigned char *e = s->out + s->pos;
    uint32_t lens[3] = {(uint32_t)c->klen, (uint32_t)c->vlen, 0};
    memcpy(e + 4, lens, 12);
    memcpy(e + 16, c->meta, 32);
    memcpy(e + ENTRY_SIZE, c->key, c->klen);
    memcpy(e + ENTRY_SIZE + c->klen, c->value, c->vlen);
    memset(e + ENTRY_SIZE + c->klen + c->vlen, 0, span - ENTRY_SIZE - c->klen - c->vlen);
    uint32_t ecrc = crc(e + 4, ENTRY_SIZE - 4 + c->klen + c->vlen);
    memcpy(e, &ecrc, 4);
    return sink_index(s, span);
}

typedef struct {
    const unsigned char *buf;
    uint64_t index_off, count, data_off, data_end;
    uint64_t i;
    const unsigned char *key; /* the current entry's key, NULL when exhausted */
    uint64_t klen, span;
    const unsigned char *entry;
} base_t;

/* Step to base entry b->i (validated: bounds, order, checksum); 0 ok, -1 corrupt. */
static int base_load(base_t *b, char *err, size_t errlen) {
    if (b->i >= b->count) { b->key = NULL; return 0; }
    uint64_t off = rd64(b->buf + b->index_off + 8 * b->i);
    if (b->data_end - b->data_off < ENTRY_SIZE || off < b->data_off
        || off > b->data_end - ENTRY_SIZE || (off & 7)) {
        snprintf(err, errlen, "base snapshot entry %llu is outside the data area",
                 (unsigned long long)b->i);
        return -1;
    }
    const unsigned char *e = b->buf + off;
    uint64_t klen = rd32(e + 4), vlen = rd32(e + 8);
    uint64_t stop = off + ENTRY_SIZE + klen + vlen;
    if (stop > b->data_end) {
        snprintf(err, errlen, "base snapshot entry at %llu runs past the data area",
                 (unsigned long long)off);
        return -1;
    }
    if (crc(e + 4, stop - off - 4) != rd32(e)) {
        snprintf(err, errlen, "base snapshot entry at %llu fails its checksum",
                 (unsigned long long)off);
        return -1;
    }
    if (b->key != NULL && bcmp3(e + ENTRY_SIZE, klen, b->key, b->klen) <= 0) {
        snprintf(err, errlen, "base snapshot keys out of order at entry %llu",
                 (unsigned long long)b->i);
        return -1;
    }
    b->entry = e;
    b->key = e + ENTRY_SIZE;
    b->klen = klen;
    b->span = entry_span(klen, vlen);
    if (b->span > b->data_end - off) {
        snprintf(err, errlen, "base snapshot entry at %llu: its padding runs past the data area",
                 (unsigned long long)off);
        return -1;
    }
    return 0;
}

/* The merge itself, without the GIL: base entries (copied as they are, their
 * checksums still hold) overlaid with the sorted changes. */
static int merge(sink_t *s, base_t *b, const change_t *ch, uint64_t nch) {
    uint64_t j = 0;
    if (b->buf != NULL && base_load(b, s->err, sizeof s->err) < 0) return -1;
    for (;;) {
        int have_base = b->buf != NULL && b->key != NULL;
        if (!have_base && j >= nch) break;
        int c = !have_base ? 1 : (j >= nch ? -1 : bcmp3(b->key, b->klen, ch[j].key, ch[j].klen));
        if (c < 0) {
            if (sink_room(s, b->span) < 0) return -1;
            memcpy(s->out + s->pos, b->entry, b->span);
            if (sink_index(s, b->span) < 0) return -1;
        } else if (!ch[j].deleted && sink_new(s, &ch[j]) < 0) {
            return -1;
        }
        if (c <= 0) {
            b->i++;
            if (base_load(b, s->err, sizeof s->err) < 0) return -1;
        }
        if (c >= 0) j++;
    }
    if (s->n != s->count || s->pos != s->data_end) {
        snprintf(s->err, sizeof s->err,
                 "the snapshot holds %llu entries in %llu bytes, %llu in %llu were planned",
                 (unsigned long long)s->n, (unsigned long long)(s->pos - s->data_off),
                 (unsigned long long)s->count, (unsigned long long)(s->data_end - s->data_off));
        return -1;
    }
    return 0;
}

static int get_u64s(PyObject *tuple, Py_ssize_t n, uint64_t *out, const char *what) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != n) {
        PyErr_Format(PyExc_TypeError, "%s must be a %zd-tuple", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tuple, i));
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* build(out, (index_off, hash_off, slots, data_off, data_end, count), keys, values, base)
 *     -> body crc32
 *
 * Fills everything of a new snapshot segment but its header: the entries of
 * `base` (None, or (buf, index_off, count, data_off, data_end) of the previous
 * snapshot) overlaid with `keys` (sorted, unique) and `values` (each None for
 * a deletion or (value, create, mod, version, lease)). The lists must not
 * change during the call. The GIL is released while bytes are copied, so the
 * writer's watch thread keeps publishing while a large snapshot is built.
 */
static PyObject *snapshot_build(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "build() takes 5 arguments");
        return NULL;
    }
    uint64_t g[6], bg[4];
    if (get_u64s(args[1], 6, g, "geometry") < 0) return NULL;
    PyObject *keys = args[2], *values = args[3], *base = args[4];
    if (!PyList_Check(keys) || !PyList_Check(values)
        || PyList_GET_SIZE(keys) != PyList_GET_SIZE(values)) {
        PyErr_SetString(PyExc_TypeError, "keys and values must be lists of one length");
        return NULL;
    }
    Py_buffer outv, basev;
    basev.obj = NULL;
    if (PyObject_GetBuffer(args[0], &outv, PyBUF_WRITABLE) < 0) return NULL;
    PyObject *result = NULL;
    change_t *ch = NULL;
    base_t b;
    memset(&b, 0, sizeof b);
    if (base != Py_None) {
        if (!PyTuple_Check(base) || PyTuple_GET_SIZE(base) != 5) {
            PyErr_SetString(PyExc_TypeError, "base must be None or a 5-tuple");
            goto done;
        }
        PyObject *rest = PyTuple_GetSlice(base, 1, 5);
        if (rest == NULL) goto done;
        int rc = get_u64s(rest, 4, bg, "base");
        Py_DECREF(rest);
        if (rc < 0) goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(base, 0), &basev, PyBUF_SIMPLE) < 0) goto done;
        uint64_t bsize = (uint64_t)basev.len;
        if (bg[3] > bsize || bg[2] > bg[3] || bg[0] > bsize || bg[1] > (bsize - bg[0]) / 8) {
            corrupt("base snapshot geometry out of bounds");
            goto done;
        }
        b.buf = basev.buf;
        b.index_off = bg[0];
        b.count = bg[1];
        b.data_off = bg[2];
        b.data_end = bg[3];
    }
    uint64_t size = (uint64_t)outv.len;
    sink_t s;
    memset(&s, 0, sizeof s);
    s.out = outv.buf;
    s.index_off = g[0]; s.hash_off = g[1]; s.slots = g[2];
    s.data_off = g[3]; s.data_end = g[4]; s.count = g[5];
    if (s.slots == 0 || (s.slots & (s.slots - 1)) || s.data_end > size || s.data_off > s.data_end
        || s.hash_off > s.data_off || s.slots > (s.data_off - s.hash_off) / 16
        || s.index_off > s.hash_off || s.count > (s.hash_off - s.index_off) / 8
        || (s.data_off & 7)) {
        PyErr_SetString(PyExc_ValueError, "snapshot geometry does not fit the segment");
        goto done;
    }
    s.pos = s.data_off;

    Py_ssize_t nch = PyList_GET_SIZE(keys);
    ch = PyMem_RawCalloc(nch ? (size_t)nch : 1, sizeof(change_t));
    if (ch == NULL) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t j = 0; j < nch; j++) {
        PyObject *k = PyList_GET_ITEM(keys, j), *v = PyList_GET_ITEM(values, j);
        if (!PyBytes_Check(k)) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            goto done;
        }
        ch[j].key = (const unsigned char *)PyBytes_AS_STRING(k);
        ch[j].klen = (uint64_t)PyBytes_GET_SIZE(k);
        if (j > 0 && bcmp3(ch[j].key, ch[j].klen, ch[j - 1].key, ch[j - 1].klen) <= 0) {
            PyErr_SetString(PyExc_ValueError, "keys must be sorted and unique");
            goto done;
        }
        if (v == Py_None) {
            ch[j].deleted = 1;
            continue;
        }
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 5
            || !PyBytes_Check(PyTuple_GET_ITEM(v, 0))) {
            PyErr_SetString(PyExc_TypeError,
                            "values must be None or (value, create, mod, version, lease)");
            goto done;
        }
        PyObject *val = PyTuple_GET_ITEM(v, 0);
        ch[j].value = (const unsigned char *)PyBytes_AS_STRING(val);
        ch[j].vlen = (uint64_t)PyBytes_GET_SIZE(val);
        if (ch[j].klen > 0xFFFFFFFFu || ch[j].vlen > 0xFFFFFFFFu) {
            PyErr_SetString(PyExc_ValueError, "key or value too long for a snapshot entry");
            goto done;
        }
        for (int m = 0; m < 4; m++) {
            ch[j].meta[m] = PyLong_AsLongLong(PyTuple_GET_ITEM(v, m + 1));
            if (PyErr_Occurred()) goto done;
        }
        if ((j & 0x3FFF) == 0x3FFF) {
            /* Let the watch thread in now and then while a large list is read. */
            Py_BEGIN_ALLOW_THREADS
            Py_END_ALLOW_THREADS
        }
    }

    int rc;
    uint32_t body = 0;
    Py_BEGIN_ALLOW_THREADS
    /* The segment is new (all zeros), but do not count on it for the table. */
    memset(s.out + s.index_off, 0, s.data_off - s.index_off);
    rc = merge(&s, &b, ch, (uint64_t)nch);
    if (rc == 0) {
        uLong c = crc(s.out + s.data_off, s.data_end - s.data_off);
        c = crc32_combine(c, crc(s.out + s.index_off, s.hash_off - s.index_off),
                          (z_off_t)(s.hash_off - s.index_off));
        c = crc32_combine(c, crc(s.out + s.hash_off, s.data_off - s.hash_off),
                          (z_off_t)(s.data_off - s.hash_off));
        body = (uint32_t)c;
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, s.err);
        goto done;
    }
    result = PyLong_FromUnsignedLong(body);
done:
    PyMem_RawFree(ch);
    if (basev.obj != NULL) PyBuffer_Release(&basev);
    PyBuffer_Release(&outv);
    return result;
}

/* -- etcd's RangeResponse, decoded for the writer's relist ------------------------------
 *
 * The protobuf wire format of etcdserverpb.RangeResponse, read straight into the
 * tuples the writer's state holds: shmcache/writer/etcd/listing.py has the
 * pure-Python twin and the message layout, and tests/test_listing.py holds both
 * to protobuf's own decoding. The message comes from the network: every length
 * is checked against the buffer, and anything that cannot be read exactly is a
 * ValueError. Unknown fields are skipped, as protobuf does. */

static int pb_varint(const unsigned char *b, size_t n, size_t *i, uint64_t *out) {
    uint64_t x = 0;
    unsigned shift = 0;
    for (;;) {
        if (*i >= n) return -1;
        unsigned char c = b[(*i)++];
        x |= (uint64_t)(c & 0x7f) << shift;
        if (c < 0x80) {
            *out = x;
            return 0;
        }
        shift += 7;
        if (shift > 63) return -1; /* longer than 10 bytes */
    }
}

/* Skip the value of a field with ``tag``; -1 if it runs past ``n`` or has a wire
 * type protobuf's etcd messages never use (groups). */
static int pb_skip(const unsigned char *b, size_t n, size_t *i, uint64_t tag) {
    uint64_t v;
    switch (tag & 7) {
    case 0: return pb_varint(b, n, i, &v);
    case 1: if (n - *i < 8) return -1; *i += 8; return 0;
    case 5: if (n - *i < 4) return -1; *i += 4; return 0;
    case 2:
        if (pb_varint(b, n, i, &v) < 0 || v > n - *i) return -1;
        *i += (size_t)v;
        return 0;
    default: return -1;
    }
}

/* A length-delimited field's extent: [*start, *start + *len) within n. */
static int pb_bytes(const unsigned char *b, size_t n, size_t *i, size_t *start, size_t *len) {
    uint64_t v;
    if (pb_varint(b, n, i, &v) < 0 || v > n - *i) return -1;
    *start = *i;
    *len = (size_t)v;
    *i += (size_t)v;
    return 0;
}

typedef struct {
    size_t key, klen, value, vlen;
    int64_t create, mod, version, lease;
} pb_kv_t;

/* One KeyValue (key 1, create_revision 2, mod_revision 3, version 4, value 5, lease 6). */
static int pb_key_value(const unsigned char *b, size_t i, size_t end, pb_kv_t *kv) {
    memset(kv, 0, sizeof(*kv));
    while (i < end) {
        uint64_t tag, v;
        if (pb_varint(b, end, &i, &tag) < 0) return -1;
        switch (tag) {
        case 0x0a: if (pb_bytes(b, end, &i, &kv->key, &kv->klen) < 0) return -1; break;
        case 0x2a: if (pb_bytes(b, end, &i, &kv->value, &kv->vlen) < 0) return -1; break;
        case 0x10: case 0x18: case 0x20: case 0x30:
            if (pb_varint(b, end, &i, &v) < 0) return -1;
            if (tag == 0x10) kv->create = (int64_t)v;
            else if (tag == 0x18) kv->mod = (int64_t)v;
            else if (tag == 0x20) kv->version = (int64_t)v;
            else kv->lease = (int64_t)v;
            break;
        default:
            if (pb_skip(b, end, &i, tag) < 0) return -1;
        }
    }
    return 0;
}

static PyObject *kv_item(const unsigned char *b, const pb_kv_t *kv) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)b + kv->key, (Py_ssize_t)kv->klen);
    PyObject *value = PyBytes_FromStringAndSize((const char *)b + kv->value,
                                                (Py_ssize_t)kv->vlen);
    PyObject *create = PyLong_FromLongLong(kv->create);
    PyObject *mod = PyLong_FromLongLong(kv->mod);
    PyObject *version = PyLong_FromLongLong(kv->version);
    PyObject *lease = PyLong_FromLongLong(kv->lease);
    PyObject *fields = NULL, *item = NULL;
    if (key && value && create && mod && version && lease
            && (fields = PyTuple_Pack(5, value, create, mod, version, lease)) != NULL
            && (item = PyTuple_Pack(2, key, fields)) != NULL) {
        /* Tuples of bytes and ints cannot be part of a cycle: untracked now, as the
         * cyclic GC would untrack them at its first pass, so the collections that
         * a relist's millions of allocations trigger do not walk them (each full
         * one would walk every item listed so far). */
        PyObject_GC_UnTrack(fields);
        PyObject_GC_UnTrack(item);
    }
    Py_XDECREF(key); Py_XDECREF(value); Py_XDECREF(create); Py_XDECREF(mod);
    Py_XDECREF(version); Py_XDECREF(lease); Py_XDECREF(fields);
    return item;
}

/* range_response(data, out) -> (cluster_id, revision, more, count, kvs, last_key)
 * RangeResponse {ResponseHeader header = 1 (cluster_id = 1, revision = 3);
 *                repeated KeyValue kvs = 2; bool more = 3; int64 count = 4}.
 * ``out`` None: only scan (what the next page's request needs); a list: append
 * (key, (value, create, mod, version, lease)) per KeyValue. */
static PyObject *range_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "range_response(data, out)");
        return NULL;
    }
    PyObject *out = args[1];
    if (out != Py_None && !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list or None");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *b = view.buf;
    size_t n = (size_t)view.len, i = 0, last = 0, last_end = 0;
    uint64_t cluster = 0, count = 0, more = 0, nkvs = 0;
    int64_t revision = 0;
    const char *bad = NULL;
    PyObject *result = NULL, *last_key = NULL;
    pb_kv_t kv;
    while (i < n && bad == NULL) {
        uint64_t tag, v;
        size_t start, len;
        if (pb_varint(b, n, &i, &tag) < 0) { bad = "truncated RangeResponse"; break; }
        switch (tag) {
        case 0x0a: /* header */
            if (pb_bytes(b, n, &i, &start, &len) < 0) { bad = "header overruns the message"; break; }
            for (size_t j = start, e = start + len; j < e;) {
                uint64_t t;
                if (pb_varint(b, e, &j, &t) < 0) { bad = "damaged header"; break; }
                if (t == 0x08 || t == 0x18) {
                    if (pb_varint(b, e, &j, &v) < 0) { bad = "damaged header"; break; }
                    if (t == 0x08) cluster = v;
                    else revision = (int64_t)v;
                } else if (pb_skip(b, e, &j, t) < 0) {
                    bad = "damaged header";
                    break;
                }
            }
            break;
        case 0x12: /* kvs */
            if (pb_bytes(b, n, &i, &start, &len) < 0) { bad = "a KeyValue overruns the message"; break; }
            nkvs++;
            last = start;
            last_end = start + len;
            if (out != Py_None) {
                if (pb_key_value(b, start, start + len, &kv) < 0) { bad = "damaged KeyValue"; break; }
                PyObject *item = kv_item(b, &kv);
                if (item == NULL) goto done;
                int rc = PyList_Append(out, item);
                Py_DECREF(item);
                if (rc < 0) goto done;
            }
            break;
        case 0x18: case 0x20:
            if (pb_varint(b, n, &i, &v) < 0) { bad = "truncated RangeResponse"; break; }
            if (tag == 0x18) more = v != 0;
            else count = v;
            break;
        default:
            if (pb_skip(b, n, &i, tag) < 0) bad = "a field overruns the message";
        }
    }
    if (bad != NULL) {
        PyErr_SetString(PyExc_ValueError, bad);
        goto done;
    }
    if (nkvs) {
        if (pb_key_value(b, last, last_end, &kv) < 0) {
            PyErr_SetString(PyExc_ValueError, "damaged KeyValue");
            goto done;
        }
        last_key = PyBytes_FromStringAndSize((const char *)b + kv.key, (Py_ssize_t)kv.klen);
    } else {
        last_key = Py_None;
        Py_INCREF(last_key);
    }
    if (last_key != NULL)
        result = Py_BuildValue("(KLOLKO)", (unsigned long long)cluster, (long long)revision,
                               more ? Py_True : Py_False, (long long)(int64_t)count,
                               (unsigned long long)nkvs, last_key);
done:
    Py_XDECREF(last_key);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"get", (PyCFunction)(void (*)(void))snapshot_get, METH_FASTCALL,
     "get(key, (buf, hash_off, slots, data_off, data_end, kvtype)) -> KeyValue | None"},
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_FASTCALL,
     "crc32(data, value=0) -> int: zlib.crc32(data, value), with PCLMULQDQ where the CPU has it"},
    {"index_run", (PyCFunction)(void (*)(void))index_run, METH_FASTCALL,
     "index_run(...) -> [bytes]: by_index's value lookup and run of keys (see indexseg.py)"},
    {"index_table", (PyCFunction)(void (*)(void))index_table, METH_FASTCALL,
     "index_table(pairs, kbase, vbase) -> (value_table, postings, nvals, values, keys)"},
    {"range", (PyCFunction)(void (*)(void))snapshot_range, METH_FASTCALL,
     "range(buf, index_off, count, data_off, data_end, start, end, limit, kvtype"
     "[, keys_only, shard_i, shard_n]) -> list"},
    {"present", (PyCFunction)(void (*)(void))snapshot_present, METH_FASTCALL,
     "present(keys, params) -> int: how many of the keys the snapshot holds (see count)"},
    {"reader_get", (PyCFunction)(void (*)(void))reader_get, METH_FASTCALL,
     "reader_get(key, state) -> KeyValue | None | state[6] (see reader.py)"},
    {"build", (PyCFunction)(void (*)(void))snapshot_build, METH_FASTCALL,
     "build(out, geometry, keys, values, base) -> body crc32 (see snapshot.write)"},
    {"range_response", (PyCFunction)(void (*)(void))range_response, METH_FASTCALL,
     "range_response(data, out) -> (cluster_id, revision, more, count, kvs, last_key): "
     "etcd's RangeResponse (see writer/etcd/listing.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmcache.format._speedups",
    "Optional C versions of the snapshot lookup, walk and build (see snapshot.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    PyObject *errors = PyImport_ImportModule("shmcache.errors");
    if (errors == NULL) return NULL;
    CorruptSegmentError = PyObject_GetAttrString(errors, "CorruptSegmentError");
    Py_DECREF(errors);
    if (CorruptSegmentError == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "CONTROL_SEQ_OFF", CONTROL_SEQ_OFF) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
