// The extension's Python module is empty: importing specops._C only loads the shared library,
// whose static initialisers register the specops_ext::* kernels with the torch dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
