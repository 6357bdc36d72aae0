/* Optional C versions of the reader's two hot loops over a snapshot segment.
 *
 * shmcache/snapshot.py holds the reference implementation in pure Python and
 * uses these only when the extension was built (it is optional at install
 * time). Both must behave identically: tests/test_snapshot.py runs the same
 * cases through both, and tests/test_fuzz.py feeds both damaged segments.
 *
 * The segment is untrusted input: every offset and length read from it is
 * checked against the buffer before use, all arithmetic is done in 64-bit
 * unsigned integers that cannot overflow for lengths bounded by the buffer,
 * and corruption raises ValueError (snapshot.py turns it into
 * CorruptSegmentError with the segment's name). The layout is little-endian;
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

static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static int64_t rds64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }

static uint32_t crc(const unsigned char *p, uint64_t n) {
    uLong c = crc32(0L, Z_NULL, 0);
    while (n > 0) { /* zlib takes uInt lengths */
        uInt chunk = n > 0x40000000u ? 0x40000000u : (uInt)n;
        c = crc32(c, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)c;
}

static PyObject *corrupt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(PyExc_ValueError, fmt, ap);
    va_end(ap);
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
 * (buf, hash_off, slots, data_off, data_end, kvtype) a Snapshot prepares once:
 * one tuple instead of six arguments keeps the reader's per-call cost down. */
static PyObject *snapshot_get(PyObject *self, PyObject *const *fargs, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(fargs[1]) || PyTuple_GET_SIZE(fargs[1]) != 6) {
        PyErr_SetString(PyExc_TypeError, "get() takes a key and a 6-tuple of parameters");
        return NULL;
    }
    PyObject *args[7];
    args[1] = fargs[0];
    args[0] = PyTuple_GET_ITEM(fargs[1], 0);
    for (int j = 1; j < 6; j++) args[j + 1] = PyTuple_GET_ITEM(fargs[1], j);
    PyObject *key = args[1];
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes");
        return NULL;
    }
    uint64_t hash_off = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t slots = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t data_off = PyLong_AsUnsignedLongLong(args[4]);
    uint64_t data_end = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (!PyType_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "kvtype must be a type");
        return NULL;
    }
    PyTypeObject *kvtype = (PyTypeObject *)args[6];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    uint64_t size = (uint64_t)view.len;
    PyObject *result = NULL;
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(key);
    uint64_t klen_want = (uint64_t)PyBytes_GET_SIZE(key);

    if (slots == 0 || (slots & (slots - 1)) || hash_off > size || slots > (size - hash_off) / 16
        || data_end > size || data_off > data_end) {
        result = corrupt("snapshot geometry out of bounds (slots %llu, data end %llu)",
                         (unsigned long long)slots, (unsigned long long)data_end);
        goto done;
    }
    uint64_t mask = slots - 1;
    uint32_t h = crc(k, klen_want);
    uint64_t i = h & mask;
    for (uint64_t n = 0; n < slots; n++) {
        const unsigned char *slot = buf + hash_off + 16 * i;
        uint64_t word = rd64(slot), off = rd64(slot + 8);
        if (off == 0) {
            if (word != 0) {
                result = corrupt("hash slot %llu is damaged (empty with a hash)",
                                 (unsigned long long)i);
                goto done;
            }
            Py_INCREF(Py_None);
            result = Py_None;
            goto done;
        }
        uint32_t sh = (uint32_t)word;
        uint32_t check = (sh ^ (uint32_t)off ^ (uint32_t)(off >> 32) ^ 0x5BD1E995u) * 0x9E3779B1u;
        if ((uint32_t)(word >> 32) != check) {
            result = corrupt("hash slot %llu fails its check", (unsigned long long)i);
            goto done;
        }
        if (sh == h) {
            if (data_end - data_off < ENTRY_SIZE || off < data_off
                || off > data_end - ENTRY_SIZE || (off & 7)) {
                result = corrupt("hash slot %llu points outside the data area (%llu)",
                                 (unsigned long long)i, (unsigned long long)off);
                goto done;
            }
            const unsigned char *e = buf + off;
            uint64_t klen = rd32(e + 4), vlen = rd32(e + 8);
            if (klen == klen_want && klen <= data_end - off - ENTRY_SIZE
                && memcmp(e + ENTRY_SIZE, k, klen) == 0) {
                uint64_t stop = off + ENTRY_SIZE + klen + vlen; /* < 2**65: no wrap in u64 */
                if (stop > data_end) {
                    result = corrupt("entry at %llu claims %llu+%llu bytes past the data area",
                                     (unsigned long long)off, (unsigned long long)klen,
                                     (unsigned long long)vlen);
                    goto done;
                }
                if (crc(e + 4, stop - off - 4) != rd32(e)) {
                    result = corrupt("entry at %llu fails its checksum", (unsigned long long)off);
                    goto done;
                }
                result = make_kv(kvtype, key, e, e + ENTRY_SIZE + klen, vlen);
                goto done;
            }
        }
        i = (i + 1) & mask;
    }
    result = corrupt("hash table has no empty slot");
done:
    PyBuffer_Release(&view);
    return result;
}

/* Lexicographic comparison of two byte strings, like bytes' < / ==. */
static int bcmp3(const unsigned char *a, uint64_t alen, const unsigned char *b, uint64_t blen) {
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c) return c;
    return alen < blen ? -1 : (alen > blen ? 1 : 0);
}

/* walk(buf, index_off, i, count, expected, data_end, end, limit, kvtype) -> list
 *
 * Entries i, i+1, ... in index order while key < end (end None: no bound) and
 * fewer than limit (-1: no limit) were taken. Entry i must start at `expected`
 * and each following one right after the previous (build() lays them out back
 * to back in key order), and keys must strictly increase.
 */
static PyObject *snapshot_walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "walk() takes 9 arguments");
        return NULL;
    }
    uint64_t index_off = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t i = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t count = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t expected = PyLong_AsUnsignedLongLong(args[4]);
    uint64_t data_end = PyLong_AsUnsignedLongLong(args[5]);
    long long limit = PyLong_AsLongLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    PyObject *end = args[6];
    if (end != Py_None && !PyBytes_Check(end)) {
        PyErr_SetString(PyExc_TypeError, "end must be bytes or None");
        return NULL;
    }
    if (!PyType_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "kvtype must be a type");
        return NULL;
    }
    PyTypeObject *kvtype = (PyTypeObject *)args[8];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    uint64_t size = (uint64_t)view.len;
    PyObject *out = PyList_New(0);
    if (out == NULL) goto fail;
    if (data_end > size || index_off > size || count > (size - index_off) / 8) {
        corrupt("snapshot geometry out of bounds (count %llu, data end %llu)",
                (unsigned long long)count, (unsigned long long)data_end);
        goto fail;
    }
    const unsigned char *prev = NULL;
    uint64_t prev_len = 0;
    for (; i < count && (limit < 0 || (long long)PyList_GET_SIZE(out) < limit); i++) {
        uint64_t off = rd64(buf + index_off + 8 * i);
        if (off != expected || data_end < ENTRY_SIZE || off > data_end - ENTRY_SIZE) {
            corrupt("sorted index is out of order: entry %llu points at %llu, expected %llu",
                    (unsigned long long)i, (unsigned long long)off,
                    (unsigned long long)expected);
            goto fail;
        }
        const unsigned char *e = buf + off;
        uint64_t klen = rd32(e + 4), vlen = rd32(e + 8);
        uint64_t stop = off + ENTRY_SIZE + klen + vlen;
        if (stop > data_end) {
            corrupt("entry at %llu claims %llu+%llu bytes past the data area",
                    (unsigned long long)off, (unsigned long long)klen, (unsigned long long)vlen);
            goto fail;
        }
        const unsigned char *k = e + ENTRY_SIZE;
        if (prev != NULL && bcmp3(k, klen, prev, prev_len) <= 0) {
            corrupt("sorted index is out of order at entry %llu", (unsigned long long)i);
            goto fail;
        }
        prev = k;
        prev_len = klen;
        expected = (stop + 7) & ~(uint64_t)7;
        if (end != Py_None && bcmp3(k, klen, (const unsigned char *)PyBytes_AS_STRING(end),
                                    (uint64_t)PyBytes_GET_SIZE(end)) >= 0)
            break;
        if (crc(e + 4, stop - off - 4) != rd32(e)) {
            corrupt("entry at %llu fails its checksum", (unsigned long long)off);
            goto fail;
        }
        PyObject *key = PyBytes_FromStringAndSize((const char *)k, (Py_ssize_t)klen);
        if (key == NULL) goto fail;
        PyObject *kv = make_kv(kvtype, key, e, k + klen, vlen);
        Py_DECREF(key);
        if (kv == NULL) goto fail;
        int rc = PyList_Append(out, kv);
        Py_DECREF(kv);
        if (rc < 0) goto fail;
    }
    PyBuffer_Release(&view);
    return out;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"get", (PyCFunction)(void (*)(void))snapshot_get, METH_FASTCALL,
     "get(key, (buf, hash_off, slots, data_off, data_end, kvtype)) -> KeyValue | None"},
    {"walk", (PyCFunction)(void (*)(void))snapshot_walk, METH_FASTCALL,
     "walk(buf, index_off, i, count, expected, data_end, end, limit, kvtype) -> list"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmcache._speedups",
    "Optional C versions of the snapshot lookup and walk (see snapshot.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
