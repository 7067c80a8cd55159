/* The compiled half of portpulse/codecs/recordbatch.py's encode_records: the records section of a
 * Kafka v2 record batch, written in one pass instead of numpy passes over varint matrices and a
 * gather index per output byte.
 *
 * encode(src, key_start, key_len, value_starts, value_lens, headers) -> bytes
 *
 *   src:          bytes-like (uint8), the buffer keys and value parts are read from;
 *   key_start, key_len: int64 buffers (n,); key_len -1 is a null key;
 *   value_starts, value_lens: tuples of int64 buffers (n,), one pair per value part; a record's
 *                 value is its parts joined in order;
 *   headers:      bytes, the header block (count and headers) every record ends with.
 *
 * Record i: varint length, i8 attributes 0, varlong timestamp delta 0, varint offset delta i,
 * varint key length, key, varint value length, value, headers; varints are Kafka's zigzag ones.
 * Exactly the bytes of recordbatch._encode_records_numpy. Raises ValueError for columns of
 * unequal length or a slice outside src.
 *
 * key_hashes(keys) -> bytearray
 *
 *   keys: a list of bytes. Returns int64 (n,): Kafka's murmur2 of each key with the sign bit
 *   cleared, what the default partitioner takes modulo the partition count (Java's
 *   Utils.murmur2, as aiokafka.partitioner.murmur2 computes it in Python).
 *
 * intern(src, start, length) -> (bytearray, list)
 *
 *   src: bytes-like (uint8); start, length: int64 buffers (n,), length -1 a null (read as b"").
 *   Returns int64 codes (n,) and the distinct slices as bytes, in order of first appearance
 *   (recordbatch.intern_slices): one hash table pass instead of numpy's word hashing and sort.
 *   Raises ValueError for a slice outside src.
 *
 * parse(data, ends, counts, base) -> (offset, key_start, key_len, value_start, value_len)
 *
 *   data: bytes-like, the record sections of b batches joined; ends, counts, base: int64 (b,),
 *   where each batch's section ends in data, its record count and its base offset. Returns five
 *   bytearrays of int64 (n,), n = sum(counts): each record's offset and where its key and value
 *   are in data (length -1: null), the columns recordbatch._parse_bodies computes with numpy.
 *   Raises ValueError when a record's framing does not fit its batch. *
 * wire_headers(data, start, length) -> (good, head_len, body, count)
 *
 *   data: bytes-like, the PortPulse wire values (codecs/wire.py) of a fetch joined; start, length:
 *   int64 (n,), where each value is (length -1: a null value). Walks every value's header (version,
 *   site, metric names) and returns four bytearrays of int64 (g,) for the g values whose framing
 *   holds (version 1, names inside the value, exactly N 18-byte readings after the count N): the
 *   value's index, its header's length from start (site and names: what is interned), where its
 *   readings start and how many it has. wire._decode_columns_numpy's checks, value by value.
 *
 * wire_readings(data, body, count, header, widths, good, table_width)
 *     -> (record, header, name_code, ts, value, flags, kept)
 *
 *   body, count, header, good: int64 (g,), each value's readings (where, how many), its header
 *   code and its index; widths: int64 (h,), the names each header holds. A value whose readings
 *   all name a metric within its header's table is kept: its readings become rows (r of them, in
 *   order), as bytearrays of int64 record (its index), header, name_code (header * table_width +
 *   the metric index), ts_ns, float64 value and uint8 flags; kept: uint8 (g,). Raises ValueError
 *   for readings outside data or a header code outside widths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../_hash.h"

#define MAX_PARTS 8

static Py_ssize_t varint_size(int64_t value) {
    uint64_t z = ((uint64_t)value << 1) ^ (uint64_t)(value >> 63);
    Py_ssize_t size = 1;
    while (z >= 0x80) {
        z >>= 7;
        size++;
    }
    return size;
}

static char *put_varint(char *out, int64_t value) {
    uint64_t z = ((uint64_t)value << 1) ^ (uint64_t)(value >> 63);
    while (z >= 0x80) {
        *out++ = (char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    *out++ = (char)z;
    return out;
}

/* An int64 column of n items from obj; 0, or -1 with an exception set. */
static int int64_column(PyObject *obj, Py_buffer *view, Py_ssize_t *n, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != 8 && !(view->len == 0)) {
        PyErr_Format(PyExc_ValueError, "%s: expected int64 items, got %zd-byte ones", what, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    Py_ssize_t count = view->len / 8;
    if (*n < 0) {
        *n = count;
    } else if (count != *n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items, expected %zd", what, count, *n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *encode(PyObject *module, PyObject *args) {
    PyObject *src_obj, *key_start_obj, *key_len_obj, *starts_obj, *lens_obj;
    Py_buffer headers;
    if (!PyArg_ParseTuple(args, "OOOO!O!y*", &src_obj, &key_start_obj, &key_len_obj, &PyTuple_Type, &starts_obj,
                          &PyTuple_Type, &lens_obj, &headers))
        return NULL;
    Py_ssize_t parts = PyTuple_GET_SIZE(starts_obj);
    if (parts != PyTuple_GET_SIZE(lens_obj) || parts > MAX_PARTS) {
        PyBuffer_Release(&headers);
        PyErr_Format(PyExc_ValueError, "value parts: %zd starts and %zd lengths (at most %d)", parts,
                     PyTuple_GET_SIZE(lens_obj), MAX_PARTS);
        return NULL;
    }
    Py_buffer src = {0}, key_start = {0}, key_len = {0}, value_start[MAX_PARTS], value_len[MAX_PARTS];
    Py_ssize_t taken = 0, n = -1;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (int64_column(key_start_obj, &key_start, &n, "key_start") < 0) goto done;
    if (int64_column(key_len_obj, &key_len, &n, "key_len") < 0) goto done_key_start;
    for (; taken < parts; taken++) {
        if (int64_column(PyTuple_GET_ITEM(starts_obj, taken), &value_start[taken], &n, "value start") < 0) break;
        if (int64_column(PyTuple_GET_ITEM(lens_obj, taken), &value_len[taken], &n, "value length") < 0) {
            PyBuffer_Release(&value_start[taken]);
            break;
        }
    }
    if (taken < parts) goto done_columns;
    {
        const char *data = src.buf;
        const int64_t *ks = key_start.buf, *kl = key_len.buf;
        const int64_t *vs[MAX_PARTS], *vl[MAX_PARTS];
        for (Py_ssize_t p = 0; p < parts; p++) {
            vs[p] = value_start[p].buf;
            vl[p] = value_len[p].buf;
        }
        /* First pass: check every slice and size the output. */
        Py_ssize_t total = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t key = kl[i] < 0 ? 0 : kl[i];
            if (kl[i] < -1 || (kl[i] > 0 && (ks[i] < 0 || ks[i] + key > src.len))) {
                PyErr_Format(PyExc_ValueError, "record %zd: key slice outside the buffer", i);
                goto done_columns;
            }
            int64_t value = 0;
            for (Py_ssize_t p = 0; p < parts; p++) {
                if (vl[p][i] < 0 || (vl[p][i] > 0 && (vs[p][i] < 0 || vs[p][i] + vl[p][i] > src.len))) {
                    PyErr_Format(PyExc_ValueError, "record %zd: value part %zd outside the buffer", i, p);
                    goto done_columns;
                }
                value += vl[p][i];
            }
            int64_t body = 2 + varint_size(i) + varint_size(kl[i]) + key + varint_size(value) + value + headers.len;
            total += varint_size(body) + body;
        }
        result = PyBytes_FromStringAndSize(NULL, total);
        if (result == NULL) goto done_columns;
        char *out = PyBytes_AS_STRING(result);
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t key = kl[i] < 0 ? 0 : kl[i];
            int64_t value = 0;
            for (Py_ssize_t p = 0; p < parts; p++) value += vl[p][i];
            int64_t body = 2 + varint_size(i) + varint_size(kl[i]) + key + varint_size(value) + value + headers.len;
            out = put_varint(out, body);
            *out++ = 0; /* attributes */
            *out++ = 0; /* timestamp delta */
            out = put_varint(out, i);
            out = put_varint(out, kl[i]);
            if (key > 0) memcpy(out, data + ks[i], (size_t)key);
            out += key;
            out = put_varint(out, value);
            for (Py_ssize_t p = 0; p < parts; p++) {
                if (vl[p][i] > 0) memcpy(out, data + vs[p][i], (size_t)vl[p][i]);
                out += vl[p][i];
            }
            memcpy(out, headers.buf, (size_t)headers.len);
            out += headers.len;
        }
    }
done_columns:
    for (Py_ssize_t p = 0; p < taken; p++) {
        PyBuffer_Release(&value_start[p]);
        PyBuffer_Release(&value_len[p]);
    }
    PyBuffer_Release(&key_len);
done_key_start:
    PyBuffer_Release(&key_start);
done:
    if (src.obj != NULL) PyBuffer_Release(&src);
    PyBuffer_Release(&headers);
    return result;
}

static uint32_t murmur2(const unsigned char *data, Py_ssize_t length) {
    const uint32_t m = 0x5bd1e995;
    uint32_t h = 0x9747b28c ^ (uint32_t)length;
    Py_ssize_t whole = length & ~(Py_ssize_t)3;
    for (Py_ssize_t i = 0; i < whole; i += 4) {
        uint32_t k = (uint32_t)data[i] | (uint32_t)data[i + 1] << 8 | (uint32_t)data[i + 2] << 16 |
                     (uint32_t)data[i + 3] << 24;
        k *= m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
    }
    switch (length & 3) {
    case 3:
        h ^= (uint32_t)data[whole + 2] << 16; /* fall through */
    case 2:
        h ^= (uint32_t)data[whole + 1] << 8; /* fall through */
    case 1:
        h ^= data[whole];
        h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

/* The distinct slices seen so far: open addressing over their first rows (-1: empty), at most half
 * full, grown as they come: sized by the distinct slices (a fetch's keys recur), not by the rows,
 * so the table stays in the cache. */
typedef struct {
    int64_t *slot;
    Py_ssize_t size;
    int64_t *first; /* per distinct slice: its first row */
    uint64_t *hash; /* per distinct slice */
    Py_ssize_t count, capacity;
} SliceTable;

static int slice_table_grow(SliceTable *t) {
    Py_ssize_t size = t->size ? t->size * 2 : 1024, capacity = size / 2;
    int64_t *slot = PyMem_Malloc((size_t)size * sizeof(int64_t));
    int64_t *first = PyMem_Realloc(t->first, (size_t)capacity * sizeof(int64_t));
    if (first != NULL) t->first = first;
    uint64_t *hash = first ? PyMem_Realloc(t->hash, (size_t)capacity * sizeof(uint64_t)) : NULL;
    if (hash != NULL) t->hash = hash;
    if (slot == NULL || first == NULL || hash == NULL) {
        PyMem_Free(slot);
        PyErr_NoMemory();
        return -1;
    }
    memset(slot, 0xff, (size_t)size * sizeof(int64_t));
    for (Py_ssize_t d = 0; d < t->count; d++) {
        Py_ssize_t at = (Py_ssize_t)(t->hash[d] & (uint64_t)(size - 1));
        while (slot[at] >= 0) at = (at + 1) & (size - 1);
        slot[at] = d;
    }
    PyMem_Free(t->slot);
    t->slot = slot;
    t->size = size;
    t->capacity = capacity;
    return 0;
}

static PyObject *intern(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *src_obj, *start_obj, *length_obj;
    if (!PyArg_ParseTuple(args, "OOO", &src_obj, &start_obj, &length_obj)) return NULL;
    Py_buffer src = {0}, start = {0}, length = {0};
    PyObject *codes = NULL, *distinct = NULL, *result = NULL;
    SliceTable table = {0};
    Py_ssize_t n = -1;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (int64_column(start_obj, &start, &n, "start") < 0) goto done_src;
    if (int64_column(length_obj, &length, &n, "length") < 0) goto done_start;
    const unsigned char *data = src.buf;
    const int64_t *s = start.buf, *len = length.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (len[i] < -1 || (len[i] > 0 && (s[i] < 0 || s[i] + len[i] > src.len))) {
            PyErr_Format(PyExc_ValueError, "slice %zd outside the buffer", i);
            goto done;
        }
    }
    codes = PyByteArray_FromStringAndSize(NULL, n * 8);
    distinct = PyList_New(0);
    if (codes == NULL || distinct == NULL || slice_table_grow(&table) < 0) goto done;
    int64_t *code = (int64_t *)PyByteArray_AS_STRING(codes);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t li = len[i] > 0 ? len[i] : 0;
        const unsigned char *p = data + (li ? s[i] : 0);
        uint64_t h = hash_bytes(p, li, 0);
        Py_ssize_t at = (Py_ssize_t)(h & (uint64_t)(table.size - 1));
        for (;;) {
            int64_t d = table.slot[at];
            if (d < 0) {
                if (table.count == table.capacity) {
                    if (slice_table_grow(&table) < 0) goto done;
                    at = (Py_ssize_t)(h & (uint64_t)(table.size - 1));
                    continue; /* the slot to fill, in the grown table */
                }
                d = table.count++;
                table.slot[at] = d;
                table.first[d] = i;
                table.hash[d] = h;
                code[i] = d;
                PyObject *bytes = PyBytes_FromStringAndSize((const char *)p, li);
                if (bytes == NULL || PyList_Append(distinct, bytes) < 0) {
                    Py_XDECREF(bytes);
                    goto done;
                }
                Py_DECREF(bytes);
                break;
            }
            int64_t j = table.first[d], lj = len[j] > 0 ? len[j] : 0;
            if (table.hash[d] == h && lj == li && (li == 0 || memcmp(data + s[j], p, (size_t)li) == 0)) {
                code[i] = d;
                break;
            }
            at = (at + 1) & (table.size - 1);
        }
    }
    result = PyTuple_Pack(2, codes, distinct);
done:
    PyMem_Free(table.slot);
    PyMem_Free(table.first);
    PyMem_Free(table.hash);
    Py_XDECREF(codes);
    Py_XDECREF(distinct);
    PyBuffer_Release(&length);
done_start:
    PyBuffer_Release(&start);
done_src:
    PyBuffer_Release(&src);
    return result;
}

/* The zigzag varint at *pos, bounded by end; moves *pos past it. -1 when it does not fit. */
static int read_varint(const unsigned char *data, Py_ssize_t end, Py_ssize_t *pos, int64_t *value) {
    uint64_t z = 0;
    for (int k = 0; k < 10; k++) {
        if (*pos >= end) return -1;
        unsigned char b = data[(*pos)++];
        z |= (uint64_t)(b & 0x7f) << (7 * k);
        if (b < 0x80) {
            *value = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            return 0;
        }
    }
    return -1;
}

static PyObject *parse(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *data_obj, *ends_obj, *counts_obj, *base_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &data_obj, &ends_obj, &counts_obj, &base_obj)) return NULL;
    Py_buffer data = {0}, ends = {0}, counts = {0}, base = {0};
    PyObject *columns[5] = {NULL, NULL, NULL, NULL, NULL}, *result = NULL;
    Py_ssize_t b = -1, n = 0;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (int64_column(ends_obj, &ends, &b, "ends") < 0) goto done_data;
    if (int64_column(counts_obj, &counts, &b, "counts") < 0) goto done_ends;
    if (int64_column(base_obj, &base, &b, "base") < 0) goto done_counts;
    const int64_t *end_of = ends.buf, *count_of = counts.buf, *base_of = base.buf;
    for (Py_ssize_t j = 0; j < b; j++) {
        if (count_of[j] < 0 || end_of[j] < (j ? end_of[j - 1] : 0) || end_of[j] > data.len) {
            PyErr_Format(PyExc_ValueError, "batch %zd: bounds or count out of range", j);
            goto done;
        }
        n += count_of[j];
    }
    for (int c = 0; c < 5; c++) {
        columns[c] = PyByteArray_FromStringAndSize(NULL, n * 8);
        if (columns[c] == NULL) goto done;
    }
    int64_t *offset = (int64_t *)PyByteArray_AS_STRING(columns[0]);
    int64_t *key_start = (int64_t *)PyByteArray_AS_STRING(columns[1]);
    int64_t *key_len = (int64_t *)PyByteArray_AS_STRING(columns[2]);
    int64_t *value_start = (int64_t *)PyByteArray_AS_STRING(columns[3]);
    int64_t *value_len = (int64_t *)PyByteArray_AS_STRING(columns[4]);
    const unsigned char *bytes = data.buf;
    Py_ssize_t pos = 0, i = 0;
    for (Py_ssize_t j = 0; j < b; j++) {
        Py_ssize_t batch_end = (Py_ssize_t)end_of[j];
        for (int64_t r = 0; r < count_of[j]; r++, i++) {
            int64_t length, skipped, delta, klen, vlen;
            if (read_varint(bytes, batch_end, &pos, &length) < 0 || length < 0 || length > batch_end - pos) {
                PyErr_SetString(PyExc_ValueError, "record lengths do not add up to the batch");
                goto done;
            }
            Py_ssize_t stop = pos + (Py_ssize_t)length;
            pos++; /* attributes: unused */
            if (pos > stop || read_varint(bytes, stop, &pos, &skipped) < 0 || read_varint(bytes, stop, &pos, &delta) < 0 ||
                read_varint(bytes, stop, &pos, &klen) < 0 || klen < -1 || (klen > 0 && klen > stop - pos)) {
                PyErr_SetString(PyExc_ValueError, "a record's key or value runs past the record");
                goto done;
            }
            key_start[i] = pos;
            key_len[i] = klen;
            pos += klen > 0 ? (Py_ssize_t)klen : 0;
            if (read_varint(bytes, stop, &pos, &vlen) < 0 || vlen < -1 || (vlen > 0 && vlen > stop - pos)) {
                PyErr_SetString(PyExc_ValueError, "a record's key or value runs past the record");
                goto done;
            }
            value_start[i] = pos;
            value_len[i] = vlen;
            offset[i] = base_of[j] + delta;
            pos = stop; /* headers: unused */
        }
        if (pos != batch_end) {
            PyErr_SetString(PyExc_ValueError, "record lengths do not add up to the batch");
            goto done;
        }
    }
    result = PyTuple_Pack(5, columns[0], columns[1], columns[2], columns[3], columns[4]);
done:
    for (int c = 0; c < 5; c++) Py_XDECREF(columns[c]);
    PyBuffer_Release(&base);
done_counts:
    PyBuffer_Release(&counts);
done_ends:
    PyBuffer_Release(&ends);
done_data:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *key_hashes(PyObject *module, PyObject *keys) {
    (void)module;
    if (!PyList_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a list of bytes");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject *out = PyByteArray_FromStringAndSize(NULL, n * 8);
    if (out == NULL) return NULL;
    int64_t *hash = (int64_t *)PyByteArray_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_Check(key)) {
            Py_DECREF(out);
            PyErr_Format(PyExc_TypeError, "key %zd is not bytes", i);
            return NULL;
        }
        hash[i] = murmur2((const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) & 0x7fffffff;
    }
    return out;
}

#define WIRE_VERSION 1
#define WIRE_MIN_VALUE 8 /* version, site length, name count, reading count */
#define WIRE_READING 18  /* i8 ts_ns, f8 value, u1 metric index, u1 flags */

static PyObject *wire_headers(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *src_obj, *start_obj, *length_obj;
    if (!PyArg_ParseTuple(args, "OOO", &src_obj, &start_obj, &length_obj)) return NULL;
    Py_buffer src = {0}, start = {0}, length = {0};
    PyObject *out[4] = {NULL, NULL, NULL, NULL}, *result = NULL;
    Py_ssize_t n = -1;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (int64_column(start_obj, &start, &n, "start") < 0) goto done_src;
    if (int64_column(length_obj, &length, &n, "length") < 0) goto done_start;
    for (int k = 0; k < 4; k++) {
        out[k] = PyByteArray_FromStringAndSize(NULL, n * 8);
        if (out[k] == NULL) goto done;
    }
    const unsigned char *data = src.buf;
    const int64_t *s = start.buf, *len = length.buf;
    int64_t *good = (int64_t *)PyByteArray_AS_STRING(out[0]), *head = (int64_t *)PyByteArray_AS_STRING(out[1]);
    int64_t *body = (int64_t *)PyByteArray_AS_STRING(out[2]), *count = (int64_t *)PyByteArray_AS_STRING(out[3]);
    Py_ssize_t g = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t a = s[i], l = len[i];
        if (l < WIRE_MIN_VALUE || a < 0 || a + l > src.len || data[a] != WIRE_VERSION) continue;
        int64_t end = a + l;
        int64_t pos = a + 4 + (int64_t)(data[a + 1] | data[a + 2] << 8); /* just past the name count */
        if (pos > end) continue;
        int names = data[pos - 1];
        for (int j = 0; j < names && pos < end; j++) pos += 1 + data[pos];
        if (pos + 4 > end) continue;
        const unsigned char *c = data + pos;
        int64_t readings = (int64_t)((uint32_t)c[0] | (uint32_t)c[1] << 8 | (uint32_t)c[2] << 16 | (uint32_t)c[3] << 24);
        if (end - pos - 4 != readings * WIRE_READING) continue;
        good[g] = i;
        head[g] = pos - a;
        body[g] = pos + 4;
        count[g] = readings;
        g++;
    }
    for (int k = 0; k < 4; k++)
        if (PyByteArray_Resize(out[k], g * 8) < 0) goto done;
    result = PyTuple_Pack(4, out[0], out[1], out[2], out[3]);
done:
    for (int k = 0; k < 4; k++) Py_XDECREF(out[k]);
    PyBuffer_Release(&length);
done_start:
    PyBuffer_Release(&start);
done_src:
    PyBuffer_Release(&src);
    return result;
}

static PyObject *wire_readings(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *src_obj, *body_obj, *count_obj, *header_obj, *widths_obj, *good_obj;
    Py_ssize_t table_width;
    if (!PyArg_ParseTuple(args, "OOOOOOn", &src_obj, &body_obj, &count_obj, &header_obj, &widths_obj, &good_obj,
                          &table_width))
        return NULL;
    Py_buffer src = {0}, body = {0}, count = {0}, header = {0}, widths = {0}, good = {0};
    PyObject *out[7] = {NULL}, *result = NULL;
    Py_ssize_t g = -1, h = -1;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (int64_column(body_obj, &body, &g, "body") < 0) goto done_src;
    if (int64_column(count_obj, &count, &g, "count") < 0) goto done_body;
    if (int64_column(header_obj, &header, &g, "header") < 0) goto done_count;
    if (int64_column(widths_obj, &widths, &h, "widths") < 0) goto done_header;
    if (int64_column(good_obj, &good, &g, "good") < 0) goto done_widths;
    const unsigned char *data = src.buf;
    const int64_t *at = body.buf, *cnt = count.buf, *hd = header.buf, *width = widths.buf, *index = good.buf;
    Py_ssize_t rows = 0;
    for (Py_ssize_t i = 0; i < g; i++) {
        if (cnt[i] < 0 || at[i] < 0 || cnt[i] > (src.len - at[i]) / WIRE_READING) {
            PyErr_Format(PyExc_ValueError, "value %zd: readings outside the buffer", i);
            goto done;
        }
        if (hd[i] < 0 || hd[i] >= h) {
            PyErr_Format(PyExc_ValueError, "value %zd: header %lld outside the widths", i, (long long)hd[i]);
            goto done;
        }
        rows += cnt[i];
    }
    static const int size[7] = {8, 8, 8, 8, 8, 1, 1};
    for (int k = 0; k < 7; k++) {
        out[k] = PyByteArray_FromStringAndSize(NULL, (k < 6 ? rows : g) * size[k]);
        if (out[k] == NULL) goto done;
    }
    int64_t *record = (int64_t *)PyByteArray_AS_STRING(out[0]), *head = (int64_t *)PyByteArray_AS_STRING(out[1]);
    int64_t *name = (int64_t *)PyByteArray_AS_STRING(out[2]), *ts = (int64_t *)PyByteArray_AS_STRING(out[3]);
    double *value = (double *)PyByteArray_AS_STRING(out[4]);
    unsigned char *flags = (unsigned char *)PyByteArray_AS_STRING(out[5]), *kept = (unsigned char *)PyByteArray_AS_STRING(out[6]);
    Py_ssize_t r = 0;
    for (Py_ssize_t i = 0; i < g; i++) {
        const unsigned char *p = data + at[i];
        int64_t w = width[hd[i]], c = cnt[i];
        int fits = 1;
        for (int64_t j = 0; j < c; j++) fits &= p[j * WIRE_READING + 16] < w;
        kept[i] = (unsigned char)fits;
        if (!fits) continue; /* a metric index beyond its name table: the whole value is bad */
        int64_t base = hd[i] * (int64_t)table_width;
        for (int64_t j = 0; j < c; j++, r++, p += WIRE_READING) {
            record[r] = index[i];
            head[r] = hd[i];
            name[r] = base + p[16];
            memcpy(&ts[r], p, 8);
            memcpy(&value[r], p + 8, 8);
            flags[r] = p[17];
        }
    }
    for (int k = 0; k < 6; k++)
        if (PyByteArray_Resize(out[k], r * size[k]) < 0) goto done;
    result = PyTuple_Pack(7, out[0], out[1], out[2], out[3], out[4], out[5], out[6]);
done:
    for (int k = 0; k < 7; k++) Py_XDECREF(out[k]);
    PyBuffer_Release(&good);
done_widths:
    PyBuffer_Release(&widths);
done_header:
    PyBuffer_Release(&header);
done_count:
    PyBuffer_Release(&count);
done_body:
    PyBuffer_Release(&body);
done_src:
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "The records section of one v2 batch (see the module comment)."},
    {"key_hashes", key_hashes, METH_O, "Kafka's positive murmur2 of each key (see the module comment)."},
    {"intern", intern, METH_VARARGS, "Codes and distinct slices (see the module comment)."},
    {"parse", parse, METH_VARARGS, "Record columns of joined record sections (see the module comment)."},
    {"wire_headers", wire_headers, METH_VARARGS, "Where each wire value's header and readings are (see the module comment)."},
    {"wire_readings", wire_readings, METH_VARARGS, "The readings of wire values as columns (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_records", NULL, -1, methods};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
