// Per-type lookups of the DLPack C exchange table and of torch's negation bit (dlpack_exchange.h).

#include "dlpack_exchange.h"

#include <unordered_map>

namespace fastattn_binding::dlpack_c {
namespace {

struct TypeTraits {
  const ExchangeApi* api = nullptr;
  bool negation_bit = false;
};

/// The table, walked back to the DLPack 1.x one if the producer's is newer; null if none.
const ExchangeApi* major_one_table(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dlpack_exchange_api")) return nullptr;
  auto* header = static_cast<ExchangeApiHeader*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
  while (header && header->version.major > 1) header = header->prev_api;
  if (!header || header->version.major != 1) return nullptr;
  const auto* api = reinterpret_cast<const ExchangeApi*>(header);
  // Imports need one of the two exporters; a table without either is not used.
  if (!api->managed_tensor_from_py_object_no_sync && !api->dltensor_from_py_object_no_sync) return nullptr;
  return api;
}

TypeTraits read_traits(PyTypeObject* type) {
  TypeTraits t;
  // Only the type's own dictionary: an inherited table is not this type's (dlpack_exchange.h).
  // From Python 3.12 the builtin types keep theirs out of tp_dict: PyType_GetDict reads both.
#if PY_VERSION_HEX >= 0x030C0000
  PyObject* dict = PyType_GetDict(type);  // new reference
#else
  PyObject* dict = type->tp_dict;
  Py_XINCREF(dict);
#endif
  if (dict) {
    if (PyObject* capsule = PyDict_GetItemString(dict, "__dlpack_c_exchange_api__")) t.api = major_one_table(capsule);
    Py_DECREF(dict);
  }
  PyObject* is_neg = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "is_neg");
  if (is_neg) {
    t.negation_bit = PyCallable_Check(is_neg) != 0;
    Py_DECREF(is_neg);
  } else {
    PyErr_Clear();
  }
  return t;
}

const TypeTraits& traits_of(PyTypeObject* type) {
  // Types stay referenced once seen, so an address is never reused by another type. Guarded by
  // the GIL, which every caller holds.
  static std::unordered_map<PyTypeObject*, TypeTraits> known;
  auto it = known.find(type);
  if (it == known.end()) {
    Py_INCREF(reinterpret_cast<PyObject*>(type));
    it = known.emplace(type, read_traits(type)).first;
  }
  return it->second;
}

}  // namespace

const ExchangeApi* exchange_api_of(PyTypeObject* type) { return traits_of(type).api; }

bool has_negation_bit(PyTypeObject* type) { return traits_of(type).negation_bit; }

}  // namespace fastattn_binding::dlpack_c
