// The linattn operator library: the Python module that loads it and the library's own
// definition. Each engine defines its operators' schemas in its folder (<engine>/schema.cpp, a
// TORCH_LIBRARY_FRAGMENT), next to their checks, kernels, fake kernels and autograd.
#include "common/cpu_isa.h"

#include <Python.h>
#include <torch/library.h>

#include <string>

// The Python module linattn._C only exists so that importing it loads this library; it has
// no functions of its own, which keeps the extension within the limited (abi3) Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(linattn, m) {
  // Which instruction-set build of the CPU kernels this process runs: "base", "avx2" or
  // "avx512" (common/cpu_isa.h; LINATTN_CPU_ISA narrows it).
  m.def("cpu_isa() -> str", [] { return std::string(linattn::cpu_isa_name(linattn::cpu_isa())); });
}
