/* The compiled half of portpulse/codecs/mqttwire.py's PacketReader: splits received bytes into
 * MQTT packets (one call per read instead of a Python step per packet).
 *
 * split(buf: bytes, v5: bool, publish: type[, message: type, received_ns: int, generation: int])
 *     -> (publishes, control, pos, need)
 *
 * Exactly what mqttwire._split_python does, and with the same messages on malformed input:
 *   publishes: for every complete PUBLISH, ``publish(topic, payload, qos, packet_id)``, or with
 *              ``message`` given, ``publish(message(topic, payload, received_ns), packet_id, qos,
 *              generation)`` (tuple subclasses, made as tuple.__new__ makes them, without their
 *              Python constructors);
 *   control:   list of (packet type, body bytes) for every other complete packet;
 *   pos:       where the first incomplete packet starts (len(buf) when none);
 *   need:      the bytes that packet needs in total, 0 when its length is not known yet.
 * Raises ValueError (the caller's MalformedPacketError) for bytes that are not MQTT.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

enum { PUBLISH = 3 };

/* Variable byte integer at buf[*at]: 1 with *value and *at moved past it; 0 when buf ends inside
 * it; -1 (ValueError set) when it runs over four bytes. */
static int varint(const unsigned char *buf, Py_ssize_t end, Py_ssize_t *at, Py_ssize_t *value) {
    Py_ssize_t result = 0, k = *at;
    for (int i = 0; i < 4; i++) {
        if (k >= end) return 0;
        unsigned char byte = buf[k++];
        result |= (Py_ssize_t)(byte & 0x7F) << (7 * i);
        if (!(byte & 0x80)) {
            *at = k;
            *value = result;
            return 1;
        }
    }
    PyErr_SetString(PyExc_ValueError, "variable byte integer longer than 4 bytes");
    return -1;
}

/* What the PUBLISH packets become: ``publish`` alone, or with ``message`` set, the receiver's own
 * nested shape stamped with a receive time and a connection generation. */
typedef struct {
    PyTypeObject *publish;
    PyTypeObject *message; /* NULL: publish(topic, payload, qos, packet_id) */
    PyObject *received_ns;
    PyObject *generation;
} Shape;

/* tuple.__new__(type, items), taking ``items`` (a new reference, or NULL after a failure): the
 * tuple type makes the instance of its subclass, so whatever a tuple holds besides its items is
 * set up as for any tuple. NULL on failure. */
static PyObject *as_subtype(PyTypeObject *type, PyObject *items) {
    PyObject *args = items ? PyTuple_Pack(1, items) : NULL;
    PyObject *out = args ? PyTuple_Type.tp_new(type, args, NULL) : NULL;
    Py_XDECREF(items);
    Py_XDECREF(args);
    return out;
}

static PyObject *make_publish(const Shape *shape, const unsigned char *buf, Py_ssize_t topic_at,
                              Py_ssize_t topic_len, Py_ssize_t at, Py_ssize_t stop, int qos, long packet_id) {
    PyObject *topic = PyUnicode_DecodeUTF8((const char *)buf + topic_at, topic_len, "replace");
    PyObject *payload = topic ? PyBytes_FromStringAndSize((const char *)buf + at, stop - at) : NULL;
    PyObject *qos_obj = payload ? PyLong_FromLong(qos) : NULL;
    PyObject *id_obj = qos_obj ? PyLong_FromLong(packet_id) : NULL;
    PyObject *publish = NULL;
    if (id_obj && shape->message == NULL) {
        publish = as_subtype(shape->publish, PyTuple_Pack(4, topic, payload, qos_obj, id_obj));
    } else if (id_obj) {
        PyObject *message = as_subtype(shape->message, PyTuple_Pack(3, topic, payload, shape->received_ns));
        publish = message ? as_subtype(shape->publish, PyTuple_Pack(4, message, id_obj, qos_obj, shape->generation))
                          : NULL;
        Py_XDECREF(message);
    }
    Py_XDECREF(topic);
    Py_XDECREF(payload);
    Py_XDECREF(qos_obj);
    Py_XDECREF(id_obj);
    return publish;
}

/* Appends to ``publishes`` the PUBLISH whose body is buf[start:stop]. Returns 0, or -1 with an
 * exception set. */
static int take_publish(const unsigned char *buf, Py_ssize_t end, Py_ssize_t start, Py_ssize_t stop,
                        unsigned char first, int v5, const Shape *shape, PyObject *publishes) {
    int qos = (first >> 1) & 3;
    if (qos == 3 || stop - start < 2) {
        PyErr_SetString(PyExc_ValueError, "PUBLISH with QoS 3 or no topic");
        return -1;
    }
    /* Reads are bounded by the end of the bytes, then the header is checked against the packet. */
    Py_ssize_t topic_len = ((Py_ssize_t)buf[start] << 8) | buf[start + 1];
    Py_ssize_t topic_at = start + 2, at = topic_at + topic_len;
    long packet_id = 0;
    int truncated = 0;
    if (qos) {
        if (at + 2 > end) {
            truncated = 1;
        } else {
            packet_id = ((long)buf[at] << 8) | buf[at + 1];
            at += 2;
        }
    }
    if (v5 && !truncated) {
        if (at >= end) {
            truncated = 1;
        } else if (buf[at] < 0x80) {
            at += 1 + buf[at];
        } else {
            Py_ssize_t properties = 0;
            int found = varint(buf, end, &at, &properties);
            if (found < 0) return -1;
            if (found == 0) {
                truncated = 1;
            } else {
                at += properties;
            }
        }
    }
    if (truncated || at > stop) {
        PyErr_SetString(PyExc_ValueError, "PUBLISH header longer than the packet");
        return -1;
    }
    PyObject *publish = make_publish(shape, buf, topic_at, topic_len, at, stop, qos, packet_id);
    if (publish == NULL) return -1;
    int failed = PyList_Append(publishes, publish);
    Py_DECREF(publish);
    return failed;
}

static PyObject *split(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if ((nargs != 3 && nargs != 6) || !PyBytes_Check(args[0]) || !PyType_Check(args[2]) ||
        !PyType_IsSubtype((PyTypeObject *)args[2], &PyTuple_Type) ||
        (nargs == 6 && (!PyType_Check(args[3]) || !PyType_IsSubtype((PyTypeObject *)args[3], &PyTuple_Type)))) {
        PyErr_SetString(PyExc_TypeError,
                        "split(buf: bytes, v5: bool, publish: tuple subclass[, message: tuple subclass, "
                        "received_ns: int, generation: int])");
        return NULL;
    }
    Shape shape = {(PyTypeObject *)args[2], NULL, NULL, NULL};
    if (nargs == 6) {
        shape.message = (PyTypeObject *)args[3];
        shape.received_ns = args[4];
        shape.generation = args[5];
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t end = PyBytes_GET_SIZE(args[0]);
    int v5 = PyObject_IsTrue(args[1]);
    if (v5 < 0) return NULL;
    PyObject *publishes = PyList_New(0);
    PyObject *control = publishes ? PyList_New(0) : NULL;
    if (control == NULL) {
        Py_XDECREF(publishes);
        return NULL;
    }
    Py_ssize_t pos = 0, need = 0;
    while (pos < end) {
        unsigned char first = buf[pos];
        Py_ssize_t at = pos + 1, length = 0;
        int found = varint(buf, end, &at, &length);
        if (found < 0) goto fail;
        if (found == 0) break;
        Py_ssize_t start = at, stop = start + length;
        if (stop > end) {
            need = stop - pos;
            break;
        }
        int kind = first >> 4;
        if (kind == PUBLISH) {
            if (take_publish(buf, end, start, stop, first, v5, &shape, publishes) < 0) goto fail;
        } else if (kind == 0 || (kind == 15 && !v5)) {
            PyErr_Format(PyExc_ValueError, "unexpected packet type %d", kind);
            goto fail;
        } else {
            PyObject *item = Py_BuildValue("(iy#)", kind, (const char *)buf + start, stop - start);
            if (item == NULL || PyList_Append(control, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
        pos = stop;
    }
    return Py_BuildValue("(NNnn)", publishes, control, pos, need);
fail:
    Py_DECREF(publishes);
    Py_DECREF(control);
    return NULL;
}

static PyMethodDef methods[] = {
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(buf, v5, publish[, message, received_ns, generation]) -> (publishes, control, pos, need): "
     "the complete MQTT packets in buf."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mqttsplit", "Compiled MQTT packet splitting for PacketReader.", -1, methods,
};

PyMODINIT_FUNC PyInit__mqttsplit(void) { return PyModule_Create(&module); }
