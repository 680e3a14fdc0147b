// The fusedrnn._C extension: schemas of the internal CPU ops (fusedrnn::cpu_rnn_forward / cpu_rnn_backward, the
// layer-op contract of docs/design.md minus `backend`), their CPU implementations, and a bare Python module so
// that `import fusedrnn._C` runs the registrations. Shapes are documented in csrc/cpu/layer.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/layer.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_rnn_forward(
    c10::string_view mode, const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, at::TensorList weights, bool has_biases, int64_t num_directions,
    bool train) {
  return fusedrnn::cpu::rnn_forward(std::string(mode), x, batch_sizes, hx, cx, weights, has_biases, num_directions,
                                    train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> cpu_rnn_backward(
    c10::string_view mode, const at::Tensor& grad_y, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, bool has_biases, int64_t num_directions, const at::Tensor& y, const at::Tensor& reserve,
    std::array<bool, 3> output_mask) {
  return fusedrnn::cpu::rnn_backward(std::string(mode), grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights,
                                     has_biases, num_directions, y, reserve,
                                     {output_mask[0], output_mask[1], output_mask[2]});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(
      "cpu_rnn_forward(str mode, Tensor x, Tensor batch_sizes, Tensor hx, Tensor? cx, Tensor[] weights, "
      "bool has_biases, int num_directions, bool train) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_rnn_backward(str mode, Tensor grad_y, Tensor grad_hy, Tensor grad_cy, Tensor x, Tensor batch_sizes, "
      "Tensor hx, Tensor? cx, Tensor[] weights, bool has_biases, int num_directions, Tensor y, Tensor reserve, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_rnn_forward", &cpu_rnn_forward);
  m.impl("cpu_rnn_backward", &cpu_rnn_backward);
}

// ---- Python module: kernel-build selection for tests and benchmarks ----------------------------------------------

static PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_AsUTF8(arg);
  if (!s) return nullptr;
  const std::string name(s);
  using fusedrnn::cpu::Capability;
  if (name.empty() || name == "auto") {
    fusedrnn::cpu::force_capability(-1);
    Py_RETURN_NONE;
  }
  const Capability c = name == "default" ? fusedrnn::cpu::kCapDefault
                       : name == "avx2"  ? fusedrnn::cpu::kCapAVX2
                       : name == "avx512" ? fusedrnn::cpu::kCapAVX512
                                          : static_cast<Capability>(-1);
  if (c < 0) {
    PyErr_SetString(PyExc_ValueError, "fusedrnn: capability should be 'auto', 'default', 'avx2' or 'avx512'");
    return nullptr;
  }
  if (!fusedrnn::cpu::capability_available(c)) {
    PyErr_Format(PyExc_RuntimeError, "fusedrnn: the %s kernels are not built or this CPU cannot run them "
                 "(torch reports CPU capability %s)", name.c_str(), at::get_cpu_capability().c_str());
    return nullptr;
  }
  fusedrnn::cpu::force_capability(c);
  Py_RETURN_NONE;
}

static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedrnn::cpu::active_capability().c_str());
}

static PyObject* amx_available(PyObject*, PyObject*) {
  if (fusedrnn::cpu::AMX::available()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyObject* gemm_library(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedrnn::cpu::gemm_library().c_str());
}

static PyObject* loop_threads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(fusedrnn::cpu::loop_thread_count()));
}

static PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(fusedrnn::cpu::empty_block_cache()));
}

static PyObject* cache_info(PyObject*, PyObject*) {
  const auto [bytes, blocks] = fusedrnn::cpu::block_cache_idle();
  const auto [min_bytes, max_blocks] = fusedrnn::cpu::block_cache_bounds();
  return Py_BuildValue("(LLLLL)", static_cast<long long>(bytes), static_cast<long long>(blocks),
                       static_cast<long long>(fusedrnn::cpu::block_cache_limit()), static_cast<long long>(min_bytes),
                       static_cast<long long>(max_blocks));
}

static PyObject* read_bandwidth(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes <= 0 || bytes > (int64_t(1) << 32)) {
    PyErr_SetString(PyExc_ValueError, "fusedrnn: read_bandwidth takes 1 to 2**32 bytes a thread");
    return nullptr;
  }
  double gbs = 0.0;
  Py_BEGIN_ALLOW_THREADS
  gbs = fusedrnn::cpu::cache_read_bandwidth(bytes) / 1e9;
  Py_END_ALLOW_THREADS
  return PyFloat_FromDouble(gbs);
}

// cell_step(mode, x, hx, cx or None, weights (a list), has_biases) -> (h, c) for "lstm", else h: one cell step
// (fusedrnn::cpu::cell_step) straight from Python, without the boxed dispatcher call torch.ops makes (argument
// conversion to IValues, the schema's checks: 2.5 us of RNNCell B1 H64's 6.2 us call). For the modules' fast path only
// (fusedrnn/fast_path.py), which has checked what the op would: plain CPU tensors of one dtype, shapes that fit,
// nothing watching the dispatcher. The GIL is released while it runs, as torch's ops release it.
static PyObject* cell_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6 || !THPVariable_Check(args[1]) || !THPVariable_Check(args[2]) ||
      !(args[3] == Py_None || THPVariable_Check(args[3])) || !PyList_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "fusedrnn: cell_step(mode, x, hx, cx or None, weights: list, has_biases)");
    return nullptr;
  }
  const char* mode = PyUnicode_AsUTF8(args[0]);
  if (!mode) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(args[4]);
  std::vector<at::Tensor> weights;
  weights.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* w = PyList_GET_ITEM(args[4], i);
    if (!THPVariable_Check(w)) {
      PyErr_SetString(PyExc_TypeError, "fusedrnn: cell_step's weights are tensors");
      return nullptr;
    }
    weights.push_back(THPVariable_Unpack(w));
  }
  const at::Tensor& x = THPVariable_Unpack(args[1]);
  const at::Tensor& hx = THPVariable_Unpack(args[2]);
  const std::optional<at::Tensor> cx =
      args[3] == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(args[3]));
  const bool has_biases = PyObject_IsTrue(args[5]) == 1;
  const std::string m(mode);
  at::Tensor h, c;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    std::tie(h, c) = fusedrnn::cpu::cell_step(m, x, hx, cx, weights, has_biases);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  if (m != "lstm") return THPVariable_Wrap(std::move(h));
  PyObject* out = PyTuple_New(2);
  if (!out) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(h)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(c)));
  return out;
}

static PyMethodDef kMethods[] = {
    {"cell_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cell_step)), METH_FASTCALL,
     "cell_step(mode, x, hx, cx or None, weights, has_biases) -> (h, c) for lstm, else h: one cell step for the "
     "modules' fast path."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "set_cpu_capability(name): 'auto' (the best this CPU runs, the default), 'default' (baseline build), 'avx2' or "
     "'avx512'."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Kernel build the CPU ops use now: 'DEFAULT', 'AVX2' or 'AVX512'."},
    {"amx_available", amx_available, METH_NOARGS,
     "Whether the bfloat16 layers can use the AMX kernel (the CPU has AMX-BF16, the OS granted the tile state)."},
    {"gemm_library", gemm_library, METH_NOARGS,
     "What the float32 layers' input projections run on now: 'onednn' or 'blas'."},
    {"loop_threads", loop_threads, METH_NOARGS,
     "Threads the small-batch loops split into now: torch's intra-op threads, at most the CPUs usable."},
    {"empty_cache", empty_cache, METH_NOARGS,
     "Frees the idle blocks of the block cache; returns their bytes."},
    {"cache_info", cache_info, METH_NOARGS,
     "(idle bytes, idle blocks, most idle bytes kept, least bytes of a block served, most idle blocks kept) of "
     "the block cache."},
    {"read_bandwidth", read_bandwidth, METH_O,
     "read_bandwidth(bytes_per_thread): GB/s the small-batch loops' threads read together, each its own buffer of "
     "that size, from wherever it stays between passes (the benchmark's probe for the ceiling)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                                     "fusedrnn compiled kernels; importing it registers torch.ops.fusedrnn.cpu_*.",
                                     -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
