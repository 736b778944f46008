// Operator schemas for the uce_fast extension. Device-independent: each
// backend registers its kernels with TORCH_LIBRARY_IMPL in its own file.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(uce_fast, m) {
  // Contract of every op: uce_fast/ops.py.
  m.def(
      "uce_forward(Tensor input, Tensor target, Tensor? samples, "
      "Tensor? sigma, Tensor? weight, float alpha, int ignore_index, "
      "float label_smoothing, int correction, bool check_labels, "
      "int ood_index, float ood_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "uce_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor norm, Tensor pixel_weight, Tensor? weight, int ignore_index, "
      "float label_smoothing, int ood_index, float ood_scale) -> Tensor");
  m.def(
      "mc_accumulate_(Tensor(a!) mean, Tensor(b!) m2, Tensor(c!) entropy, "
      "Tensor samples, int count, int in_h, int in_w, int out_h, int out_w, "
      "bool align_corners) -> ()");
  m.def(
      "mc_reduce(Tensor? samples, Tensor? mean, Tensor? m2, Tensor? entropy, "
      "int count, int in_h, int in_w, int out_h, int out_w, bool align_corners, "
      "int correction, bool want_probs, bool want_entropy) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Not differentiable: the backward op (no double backward through the loss)
// and the uncertainty statistics (constants of the loss). Their outputs do not
// require grad, so differentiating them fails loudly instead of silently.
// uce_forward's autograd formula is registered from Python (uce_fast/ops.py).
TORCH_LIBRARY_IMPL(uce_fast, Autograd, m) {
  m.impl("uce_backward", torch::CppFunction::makeFallthrough());
  m.impl("mc_accumulate_", torch::CppFunction::makeFallthrough());
  m.impl("mc_reduce", torch::CppFunction::makeFallthrough());
}

namespace uce_cpu {
const char* isa_name();  // csrc/cpu/uce_cpu.cpp
}

// `import uce_fast._C` loads this shared library so that the static
// registrations above run; the module itself only reports build facts.
static PyObject* uce_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(uce_cpu::isa_name());
}

static PyMethodDef uce_fast_c_methods[] = {
    {"cpu_isa", uce_cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels: 'generic', 'avx2' or 'avx512'."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef uce_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                // m_name
    nullptr,             // m_doc
    -1,                  // m_size
    uce_fast_c_methods,  // m_methods
    nullptr,             // m_slots
    nullptr,             // m_traverse
    nullptr,             // m_clear
    nullptr,             // m_free
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&uce_fast_c_module); }
