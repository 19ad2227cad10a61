// SPDX-License-Identifier: MIT
// `import longheads`: the library over NumPy arrays (pybind11). q, k and v are float32 arrays
// [T, heads, d] read in place (any token stride, heads and d dense); outputs are written into
// a given array or a new one. A layer's policy set is chosen by name, the same names as the
// llama2.c host's --policy (examples/llama2c/policies.hpp); the GIL is released while the
// library runs, so its thread pool works in parallel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <longheads/longheads.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "llama2c/policies.hpp"

namespace py = pybind11;
using namespace longheads;

namespace {

/// A [T, heads, d] float32 array viewed in place: heads and d must be dense, the token stride
/// is free (a slice of a fused QKV buffer is fine). Anything else would need a copy: refused.
template <class T>
tensor_view<T> view_of(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<float>>(a))
    throw py::type_error(std::string(name) + " must be a float32 array, got dtype " + std::string(py::str(a.dtype())));
  if (a.ndim() != 3) throw shape_error(std::string(name) + " must be [tokens, heads, head_dim], got " + std::to_string(a.ndim()) + " dimensions");
  const auto T_ = a.shape(0), H = a.shape(1), d = a.shape(2);
  const auto s0 = a.strides(0), s1 = a.strides(1), s2 = a.strides(2);
  if (T_ == 0) throw shape_error(std::string(name) + " has 0 tokens, expected at least 1");
  if ((d > 1 && s2 != 4) || (H > 1 && s1 != 4 * d))
    throw shape_error(std::string(name) + " must have dense heads and head_dim (strides [*, 4*head_dim, 4] bytes) to be read in place, got "
                      "strides [" + std::to_string(s0) + ", " + std::to_string(s1) + ", " + std::to_string(s2) + "]; np.ascontiguousarray() makes such a copy");
  if (T_ > 1 && (s0 <= 0 || s0 % 4 != 0))
    throw shape_error(std::string(name) + " has token stride " + std::to_string(s0) + " bytes: the token stride may be any positive multiple of 4 "
                      "(a reversed view such as q[::-1] is not read in place; np.ascontiguousarray() makes such a copy)");
  if constexpr (std::is_const_v<T>) {
    return {static_cast<const float*>(a.data()), T_, H, d, T_ > 1 ? s0 / 4 : H * d};
  } else {
    if (!a.writeable()) throw py::value_error(std::string(name) + " is read-only");
    return {static_cast<float*>(const_cast<void*>(a.data())), T_, H, d, T_ > 1 ? s0 / 4 : H * d};
  }
}

attention_method method_from(const std::string& name) {
  if (name == "longheads") return attention_method::longheads;
  if (name == "dense") return attention_method::dense;
  if (name == "sink_window" || name == "sink-window") return attention_method::sink_window;
  throw config_error("method must be 'longheads', 'dense' or 'sink_window', got '" + name + "'");
}
kv_precision storage_from(const std::string& name) {
  if (name == "fp32") return kv_precision::fp32;
  if (name == "bf16") return kv_precision::bf16;
  if (name == "int8") return kv_precision::int8;
  throw config_error("kv_storage must be 'fp32', 'bf16' or 'int8', got '" + name + "'");
}

// ------------------------------------------------------------------------- Python policies
/// A Python policy's failure: it raised, or returned what cannot be its result. Raised as
/// longheads.PolicyError (a longheads.Error), the policy's own exception as its __cause__.
struct policy_error : error {
  using error::error;
};

/// longheads.PolicyError, registered with the module.
PyObject*& policy_error_type() {
  static PyObject* type = nullptr;
  return type;
}

/// A Python function a policy calls, and the first failure of the current call (the library's
/// stages cannot throw: the call finishes, then the module raises it): the exception the
/// function raised (or its result's conversion), or a result of the wrong shape (shape_error).
struct python_callback {
  py::function fn;
  const char* role = "";  ///< "scorer" or "encoder", for the messages
  std::optional<py::error_already_set> failure;
  std::optional<shape_error> wrong_shape;
  bool failed() const noexcept { return failure || wrong_shape; }
  void reset() noexcept {
    failure.reset();
    wrong_shape.reset();
  }
};

/// "(a, b, ...)", a result's shape for a message.
std::string shape_string(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// A [rows, cols] copy of a matrix view (the function may keep it; the view's memory it may not).
py::array_t<float> copy_of(matrix_view<const float> m) {
  py::array_t<float> a({m.rows(), m.cols()});
  for (std::ptrdiff_t r = 0; r < m.rows(); ++r) std::copy_n(m.row(r), m.cols(), a.mutable_data(r, 0));
  return a;
}

/// Runs f() with the GIL; a Python exception (or a wrong result) becomes the callback's failure.
template <class F>
bool call_python(python_callback& callback, F&& f) noexcept {
  py::gil_scoped_acquire gil;
  if (callback.failed()) return false;  // one failure per call is enough
  try {
    f();
    return true;
  } catch (py::error_already_set& e) {
    callback.failure.emplace(std::move(e));
  } catch (const shape_error& e) {
    callback.wrong_shape.emplace(e);
  } catch (const py::builtin_exception& e) {
    e.set_error();
    callback.failure.emplace();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    callback.failure.emplace();
  }
  return false;
}

/// The policy's result as a C-contiguous float32 array (a conversion's own exception is the
/// policy's failure, as one it raised).
using float_result = py::array_t<float, py::array::c_style | py::array::forcecast>;

/// chunk_scorer calling scorer(queries[m, d] (pre-RoPE), summaries[n, r], first_position,
/// chunk_size) -> scores[m, n]. On a failure the scores are -inf and the call raises.
struct python_scorer {
  std::shared_ptr<python_callback> callback;
  std::size_t floats = 0;  ///< the encoder's representation size

  std::size_t representation_floats(const attention_config&) const noexcept { return floats; }
  std::size_t scratch_floats(const attention_config&, std::ptrdiff_t) const noexcept { return 0; }
  void validate(const attention_config&) const {}
  void score(const scoring_inputs& in, matrix_view<float> scores, std::span<float>) const noexcept {
    const bool ok = call_python(*callback, [&] {
      const float_result result = callback->fn(copy_of(in.queries), copy_of(in.representations), in.first_position, in.chunk_size);
      if (result.ndim() != 2 || result.shape(0) != scores.rows() || result.shape(1) != scores.cols())
        throw shape_error("scorer: returned scores of shape " + shape_string(result) + ", expected (" + std::to_string(scores.rows()) + ", " +
                          std::to_string(scores.cols()) + ") (queries x chunks)");
      for (std::ptrdiff_t r = 0; r < scores.rows(); ++r) std::copy_n(result.data(r, 0), scores.cols(), scores.row(r));
    });
    if (!ok)
      for (std::ptrdiff_t r = 0; r < scores.rows(); ++r) std::fill_n(scores.row(r), scores.cols(), -std::numeric_limits<float>::infinity());
  }
};

/// chunk_encoder calling encoder(queries[w, d], keys[w, d], values[w, d]) -> representation[r]
/// (queries and keys rotated at their positions in the chunk). On a failure: zeros, and the call raises.
struct python_encoder {
  std::shared_ptr<python_callback> callback;
  std::size_t floats = 0;  ///< representation_floats given to Attention

  std::size_t representation_floats(const attention_config&) const noexcept { return floats; }
  std::size_t scratch_floats(const attention_config&) const noexcept { return 0; }
  void validate(const attention_config&) const {
    if (floats == 0) throw config_error("a Python encoder needs representation_floats > 0");
  }
  void encode(const chunk_inputs& in, std::span<float> representation, std::span<float>) const noexcept {
    const bool ok = call_python(*callback, [&] {
      const float_result result = callback->fn(copy_of(in.queries), copy_of(in.keys), copy_of(in.values));
      if (result.size() != static_cast<py::ssize_t>(representation.size()))
        throw shape_error("encoder: returned a representation of shape " + shape_string(result) + " (" + std::to_string(result.size()) +
                          " floats), expected " + std::to_string(representation.size()) + " floats (representation_floats)");
      std::copy_n(result.data(), representation.size(), representation.data());
    });
    if (!ok) std::fill(representation.begin(), representation.end(), 0.0f);
  }
};

struct pooled : paper_policies {
  using executor = thread_pool_executor;
};
/// A policy's encoder with a Python scorer (flat scan, per-head selection).
template <class Encoder>
struct python_scored : pooled {
  using encoder = Encoder;
  using scorer = python_scorer;
};
/// Both in Python.
struct python_encoded : pooled {
  using encoder = python_encoder;
  using scorer = python_scorer;
};
static_assert(chunk_scorer<python_scorer> && chunk_encoder<python_encoder>);

/// One layer of any policy set, behind one interface.
class layer {
 public:
  virtual ~layer() = default;
  virtual const attention_config& config() const = 0;
  virtual kv_cache make_cache(std::int64_t reserve) const = 0;
  virtual void prefill(kv_cache&, tensor_view<const float>, tensor_view<const float>, tensor_view<const float>, tensor_view<float>,
                       std::span<std::int32_t>) = 0;
  virtual void decode(kv_cache&, tensor_view<const float>, tensor_view<const float>, tensor_view<const float>, tensor_view<float>,
                      std::span<std::int32_t>) = 0;
  virtual void ingest(kv_cache&, tensor_view<const float>, tensor_view<const float>, tensor_view<const float>) = 0;
  virtual void decode(std::span<const sequence_call>) = 0;
  virtual void save(const std::string& path, const std::vector<kv_cache*>& caches) const = 0;
  virtual std::vector<kv_cache> load(const std::string& path, std::int64_t reserve) const = 0;
  virtual float max_input_magnitude() const = 0;
  virtual const rope& rotary() const = 0;
};

template <class P>
class layer_of final : public layer {
 public:
  layer_of(const attention_config& c, const rope& r, typename attention<P>::policy_set set) : a_(c, r, std::move(set)) {}
  const attention_config& config() const override { return a_.config(); }
  kv_cache make_cache(std::int64_t reserve) const override { return a_.make_cache(reserve); }
  void prefill(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v, tensor_view<float> out,
               std::span<std::int32_t> selections) override {
    a_.prefill(cache, q, k, v, out, selections);
  }
  void decode(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v, tensor_view<float> out,
              std::span<std::int32_t> selections) override {
    a_.decode(cache, q, k, v, out, selections);
  }
  void ingest(kv_cache& cache, tensor_view<const float> q, tensor_view<const float> k, tensor_view<const float> v) override {
    a_.ingest(cache, q, k, v);
  }
  void decode(std::span<const sequence_call> batch) override { a_.decode(batch); }
  void save(const std::string& path, const std::vector<kv_cache*>& caches) const override {
    cache_file_writer file(path);
    for (const kv_cache* c : caches) file.save(a_, *c);
    file.commit();
  }
  std::vector<kv_cache> load(const std::string& path, std::int64_t reserve) const override {
    cache_file_reader file(path);
    std::vector<kv_cache> caches;
    while (!file.at_end()) caches.push_back(file.load(a_, reserve));
    return caches;
  }
  float max_input_magnitude() const override { return a_.max_input_magnitude(); }
  const rope& rotary() const override { return a_.rotary(); }

 private:
  attention<P> a_;
};

/// The Python `Attention`: a layer and what it was made with.
struct py_attention {
  std::unique_ptr<layer> impl;
  std::string policy;
  unsigned threads = 1;
  std::vector<std::shared_ptr<python_callback>> callbacks;  // Python policies, if any

  /// Runs a call; with Python policies, on a Python failure the cache goes back to what it was
  /// and the failure is raised (the library's call itself cannot fail once validated).
  template <class F>
  void guarded(kv_cache& cache, F&& call) {
    guarded(std::vector<kv_cache*>{&cache}, std::forward<F>(call));
  }
  template <class F>
  void guarded(const std::vector<kv_cache*>& caches, F&& call) {
    if (callbacks.empty()) {
      py::gil_scoped_release unlocked;
      return call();
    }
    std::vector<kv_cache> before;
    for (kv_cache* c : caches) before.push_back(*c);
    for (auto& c : callbacks) c->reset();
    {
      py::gil_scoped_release unlocked;
      call();
    }
    for (auto& c : callbacks)
      if (c->failed()) {
        for (std::size_t i = 0; i < caches.size(); ++i) *caches[i] = before[i];
        if (c->wrong_shape) {
          const shape_error wrong = *c->wrong_shape;
          c->reset();
          throw wrong;
        }
        py::error_already_set cause = std::move(*c->failure);
        c->reset();
        const std::string message = std::string("the Python ") + c->role + " raised " + cause.what() + " (its exception is this one's __cause__)";
        py::raise_from(cause, policy_error_type(), message.c_str());
        throw py::error_already_set();
      }
  }

  /// out (given or new) and, when asked, the selections [T, H_q, k] (-1 padded).
  py::object run(kv_cache& cache, const py::array& q, const py::array& k, const py::array& v, std::optional<py::array> out,
                 bool selections, bool single) {
    const auto qv = view_of<const float>(q, "q"), kv = view_of<const float>(k, "k"), vv = view_of<const float>(v, "v");
    py::array result = out ? *out : py::array(py::array_t<float>({qv.tokens(), qv.heads(), qv.head_dim()}));
    const auto ov = view_of<float>(result, "out");
    const attention_config& c = impl->config();
    py::array_t<std::int32_t> chosen;
    std::span<std::int32_t> chosen_span;
    if (selections) {
      if (c.method != attention_method::longheads) throw config_error("selections are LongHeads' only: this layer's method is " + std::string(to_string(c.method)));
      chosen = py::array_t<std::int32_t>({qv.tokens(), static_cast<py::ssize_t>(c.n_q_heads), static_cast<py::ssize_t>(c.budget_chunks)});
      chosen_span = {chosen.mutable_data(), static_cast<std::size_t>(chosen.size())};
    }
    guarded(cache, [&] {
      if (single) impl->decode(cache, qv, kv, vv, ov, chosen_span);
      else impl->prefill(cache, qv, kv, vv, ov, chosen_span);
    });
    if (selections) return py::make_tuple(result, chosen);
    return result;
  }
};

}  // namespace

PYBIND11_MODULE(longheads, m) {
  m.doc() = "LongHeads long-context attention (C++20 header-only library) over NumPy arrays";

  auto base = py::register_exception<error>(m, "Error", PyExc_ValueError);
  py::register_exception<shape_error>(m, "ShapeError", base.ptr());
  py::register_exception<config_error>(m, "ConfigError", base.ptr());
  py::register_exception<value_error>(m, "ValueError", base.ptr());
  py::register_exception<limit_error>(m, "LimitError", base.ptr());
  py::register_exception<file_error>(m, "FileError", base.ptr());
  policy_error_type() = py::register_exception<policy_error>(m, "PolicyError", base.ptr()).ptr();

  py::class_<attention_config>(m, "AttentionConfig", "The shape and knobs of one layer (docs/configuration.md).")
      .def(py::init([](int n_q_heads, int n_kv_heads, int head_dim, int chunk_size, int budget_chunks, int sink_chunks, int local_chunks,
                       int sink_tokens, const std::string& method, float softmax_scale, bool reject_nonfinite, const std::string& kv_storage,
                       bool spread_encoding, int rollback_chunks) {
             attention_config c;
             c.n_q_heads = n_q_heads;
             c.n_kv_heads = n_kv_heads;
             c.head_dim = head_dim;
             c.chunk_size = chunk_size;
             c.budget_chunks = budget_chunks;
             c.sink_chunks = sink_chunks;
             c.local_chunks = local_chunks;
             c.sink_tokens = sink_tokens;
             c.method = method_from(method);
             c.softmax_scale = softmax_scale;
             c.reject_nonfinite = reject_nonfinite;
             c.kv_storage = storage_from(kv_storage);
             c.spread_encoding = spread_encoding;
             c.rollback_chunks = rollback_chunks;
             return c;
           }),
           py::kw_only(), py::arg("n_q_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("chunk_size") = 256,
           py::arg("budget_chunks") = 16, py::arg("sink_chunks") = 1, py::arg("local_chunks") = 2, py::arg("sink_tokens") = 4,
           py::arg("method") = "longheads", py::arg("softmax_scale") = 0.0f, py::arg("reject_nonfinite") = true, py::arg("kv_storage") = "fp32",
           py::arg("spread_encoding") = true, py::arg("rollback_chunks") = 0)
      .def_readwrite("n_q_heads", &attention_config::n_q_heads)
      .def_readwrite("n_kv_heads", &attention_config::n_kv_heads)
      .def_readwrite("head_dim", &attention_config::head_dim)
      .def_readwrite("chunk_size", &attention_config::chunk_size)
      .def_readwrite("budget_chunks", &attention_config::budget_chunks)
      .def_readwrite("sink_chunks", &attention_config::sink_chunks)
      .def_readwrite("local_chunks", &attention_config::local_chunks)
      .def_readwrite("sink_tokens", &attention_config::sink_tokens)
      .def_readwrite("softmax_scale", &attention_config::softmax_scale)
      .def_readwrite("reject_nonfinite", &attention_config::reject_nonfinite)
      .def_readwrite("spread_encoding", &attention_config::spread_encoding)
      .def_readwrite("rollback_chunks", &attention_config::rollback_chunks)
      .def_property("method", [](const attention_config& c) { return std::string(c.method == attention_method::sink_window ? "sink_window" : to_string(c.method)); },
                    [](attention_config& c, const std::string& s) { c.method = method_from(s); })
      .def_property("kv_storage", [](const attention_config& c) { return std::string(to_string(c.kv_storage)); },
                    [](attention_config& c, const std::string& s) { c.kv_storage = storage_from(s); })
      .def("validate", &attention_config::validate, "Raises ConfigError naming the first impossible setting.")
      .def("budget_tokens", &attention_config::budget_tokens);

  py::class_<rope>(m, "Rope", "RoPE tables: layout 'half' (Hugging Face/NeoX) or 'interleaved' (Meta, llama2.c), optional scaling.")
      .def(py::init([](int head_dim, double base, const std::string& layout, const std::string& scaling, double factor, double original_context) {
             rope_layout l = layout == "half" ? rope_layout::half : layout == "interleaved" ? rope_layout::interleaved
                             : throw config_error("layout must be 'half' or 'interleaved', got '" + layout + "'");
             if (scaling == "none") return rope(head_dim, base, l);
             if (scaling == "linear") return rope(head_dim, base, l, linear_scaling{factor});
             if (scaling == "ntk") return rope(head_dim, base, l, ntk_scaling{factor});
             if (scaling == "yarn") return rope(head_dim, base, l, yarn_scaling{.factor = factor, .original_context = original_context});
             throw config_error("scaling must be 'none', 'linear', 'ntk' or 'yarn', got '" + scaling + "'");
           }),
           py::arg("head_dim"), py::arg("base") = 10000.0, py::arg("layout") = "half", py::kw_only(), py::arg("scaling") = "none",
           py::arg("factor") = 1.0, py::arg("original_context") = 4096.0)
      .def_property_readonly("head_dim", &rope::head_dim)
      .def("rotate", [](const rope& r, const py::array_t<float, py::array::c_style | py::array::forcecast>& x, const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& positions) {
             if (x.ndim() != 2 || x.shape(1) != r.head_dim() || positions.ndim() != 1 || positions.shape(0) != x.shape(0))
               throw shape_error("rotate: x must be [m, head_dim = " + std::to_string(r.head_dim()) + "] and positions [m]");
             py::array_t<float> out({x.shape(0), x.shape(1)});
             for (py::ssize_t i = 0; i < x.shape(0); ++i) r.rotate(x.data(i, 0), out.mutable_data(i, 0), positions.data()[i]);
             return out;
           }, py::arg("x"), py::arg("positions"), "x [m, d] rotated row i by positions[i]: the library's own rotation, bit for bit.");

  py::class_<kv_cache>(m, "Cache", "One sequence's cache for one layer (Attention.make_cache()).")
      .def_property_readonly("tokens", &kv_cache::tokens)
      .def_property_readonly("full_chunks", &kv_cache::full_chunks)
      .def_property_readonly("capacity_tokens", &kv_cache::capacity_tokens)
      .def("reserve", &kv_cache::reserve, py::arg("tokens"))
      .def("clear", &kv_cache::clear)
      .def("truncate", &kv_cache::truncate, py::arg("tokens"), "Back to `tokens` tokens: a chunk boundary, or any length from rewindable_from.")
      .def_property_readonly("rewindable_from", &kv_cache::rewindable_from)
      .def("last_selection", [](const kv_cache& c, int head) {
             if (head < 0 || head >= c.shape().n_q_heads) throw shape_error("head " + std::to_string(head) + " is not in [0, " + std::to_string(c.shape().n_q_heads) + ")");
             const auto s = c.last_selection(head);
             return py::array_t<std::int32_t>(static_cast<py::ssize_t>(s.size()), s.data());
           }, py::arg("head"), "Chunk ids the head read for the last query of the last call, ascending.")
      .def("bytes_by_kind", [](const kv_cache& c) {
        const auto b = c.bytes_by_kind();
        return py::dict(py::arg("keys") = b.keys, py::arg("values") = b.values, py::arg("representations") = b.representations,
                        py::arg("open_chunk") = b.open_chunk, py::arg("selections") = b.selections, py::arg("index") = b.index);
      })
      .def("copy", [](const kv_cache& c) { return kv_cache(c); })
      .def("__eq__", [](const kv_cache& a, const kv_cache& b) { return a == b; });

  py::class_<py_attention>(m, "Attention", "One attention layer: LongHeads (policy set by name) or a baseline (config.method).")
      .def(py::init([](const attention_config& config, const rope& rotary, const std::string& policy, unsigned threads, int beam, int branching,
                       float epsilon, std::optional<py::function> scorer, std::optional<py::function> encoder, std::size_t representation_floats,
                       std::optional<int> segment_chunks, std::optional<int> segment_clusters, std::optional<float> probe_share,
                       std::optional<int> probe_min, std::optional<int> probe_max, std::optional<std::string> probe_order,
                       std::optional<int> read_max) {
             llama2c::policies::knobs knobs;
             knobs.threads = threads;
             if (beam > 0) knobs.beam = beam;
             knobs.branching = branching;
             knobs.epsilon = epsilon;
             // The key-cluster index's knobs: only for the policy that has one (checked by its validate()).
             if ((segment_chunks || segment_clusters || probe_share || probe_min || probe_max || probe_order || read_max) && policy != "quest-clusters")
               throw config_error("segment_chunks, segment_clusters, probe_share, probe_min, probe_max, probe_order and read_max are the key-cluster index's: "
                                  "only for policy 'quest-clusters', got policy '" + policy + "'");
             if (segment_chunks) knobs.clusters.segment_chunks = *segment_chunks;
             if (segment_clusters) knobs.clusters.clusters = *segment_clusters;
             if (probe_share) knobs.clusters.probe_share = *probe_share;
             if (probe_min) knobs.clusters.probe_min = *probe_min;
             if (probe_max) knobs.clusters.probe_max = *probe_max;
             if (read_max) knobs.clusters.read_max = *read_max;
             if (probe_order) {
               if (*probe_order != "mixed" && *probe_order != "box") throw config_error("probe_order must be 'mixed' or 'box', got '" + *probe_order + "'");
               knobs.clusters.probe_order = *probe_order == "box" ? cluster_probe::box_bound : cluster_probe::box_and_centre;
             }
             py_attention a{nullptr, policy, threads, {}};
             const auto& names = llama2c::policies::names();
             if (std::find(names.begin(), names.end(), policy) == names.end()) {
               std::string known;
               for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
               throw config_error("unknown policy '" + policy + "'; known: " + known);
             }
             if (encoder && !scorer) throw config_error("a Python encoder needs a Python scorer (scorer=...), which reads its representation");
             if (encoder) {
               auto score = std::make_shared<python_callback>(python_callback{*scorer, "scorer", {}, {}}),
                    encode = std::make_shared<python_callback>(python_callback{*encoder, "encoder", {}, {}});
               attention<python_encoded>::policy_set set;
               set.executor = thread_pool_executor(threads);
               set.encoder = {encode, representation_floats};
               set.scorer = {score, representation_floats};
               a.impl = std::make_unique<layer_of<python_encoded>>(config, rotary, std::move(set));
               a.callbacks = {score, encode};
               return a;
             }
             llama2c::policies::with_policy(policy, [&](auto tag) {
               using P = typename decltype(tag)::type;
               auto set = llama2c::policies::make_set<P>(knobs);
               if (!scorer) {
                 a.impl = std::make_unique<layer_of<P>>(config, rotary, std::move(set));
                 return;
               }
               // The policy's encoder (with its knobs) under a Python scorer.
               using encoder_type = typename attention<P>::encoder_type;
               auto score = std::make_shared<python_callback>(python_callback{*scorer, "scorer", {}, {}});
               typename attention<python_scored<encoder_type>>::policy_set scored;
               scored.executor = thread_pool_executor(threads);
               scored.encoder = set.encoder;
               scored.scorer = {score, set.encoder.representation_floats(config)};
               a.impl = std::make_unique<layer_of<python_scored<encoder_type>>>(config, rotary, std::move(scored));
               a.callbacks = {score};
             });
             return a;
           }),
           py::arg("config"), py::arg("rope"), py::kw_only(), py::arg("policy") = "paper", py::arg("threads") = 1, py::arg("beam") = 0,
           py::arg("branching") = 0, py::arg("epsilon") = 0.0f, py::arg("scorer") = py::none(), py::arg("encoder") = py::none(), py::arg("representation_floats") = 0,
           py::arg("segment_chunks") = py::none(), py::arg("segment_clusters") = py::none(), py::arg("probe_share") = py::none(),
           py::arg("probe_min") = py::none(), py::arg("probe_max") = py::none(), py::arg("probe_order") = py::none(), py::arg("read_max") = py::none(),
           "policy: a name from policies(); beam, branching: the index policies' (0: their defaults); epsilon: quest-certified's "
           "slack (0: exactly the flat scan's chunks); scorer: a Python function replacing the policy's scorer (its encoder kept, every chunk "
           "scored); encoder (with scorer and representation_floats): a Python function replacing the encoder too; segment_chunks, "
           "segment_clusters, probe_share, probe_min, probe_max, probe_order ('mixed' or 'box'), read_max: quest-clusters' key_cluster_index "
           "(None: its defaults).")
      .def_property_readonly("config", [](const py_attention& a) { return a.impl->config(); })
      .def_property_readonly("policy", [](const py_attention& a) { return a.policy; })
      .def_property_readonly("threads", [](const py_attention& a) { return a.threads; })
      .def_property_readonly("max_input_magnitude", [](const py_attention& a) { return a.impl->max_input_magnitude(); })
      .def("make_cache", [](const py_attention& a, std::int64_t reserve) { return a.impl->make_cache(reserve); }, py::arg("reserve") = 0)
      .def("prefill", [](py_attention& a, kv_cache& cache, const py::array& q, const py::array& k, const py::array& v, std::optional<py::array> out,
                         bool selections) { return a.run(cache, q, k, v, std::move(out), selections, false); },
           py::arg("cache"), py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("out") = py::none(), py::arg("selections") = false,
           "Appends T tokens and returns their attention [T, H_q, d] (and the selections [T, H_q, k] when asked).")
      .def("decode", [](py_attention& a, kv_cache& cache, const py::array& q, const py::array& k, const py::array& v, std::optional<py::array> out,
                        bool selections) { return a.run(cache, q, k, v, std::move(out), selections, true); },
           py::arg("cache"), py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("out") = py::none(), py::arg("selections") = false,
           "prefill() of exactly one token.")
      .def("decode_batch", [](py_attention& a, const std::vector<kv_cache*>& caches, const py::array& q, const py::array& k, const py::array& v,
                              std::optional<py::array> out) {
             // One token of each of B sequences: row i of q, k, v (and out) is sequence i's.
             const auto qv = view_of<const float>(q, "q"), kv = view_of<const float>(k, "k"), vv = view_of<const float>(v, "v");
             py::array result = out ? *out : py::array(py::array_t<float>({qv.tokens(), qv.heads(), qv.head_dim()}));
             const auto ov = view_of<float>(result, "out");
             const auto sequences = static_cast<std::ptrdiff_t>(caches.size());
             for (const auto& [name, t] : {std::pair{"k", kv}, std::pair{"v", vv}, std::pair{"out", tensor_view<const float>(ov)}, std::pair{"q", qv}})
               if (t.tokens() != sequences)
                 throw shape_error("decode_batch: " + std::string(name) + " has " + std::to_string(t.tokens()) + " rows for " +
                                   std::to_string(sequences) + " caches (one token per sequence)");
             std::vector<sequence_call> batch;
             for (std::ptrdiff_t i = 0; i < sequences; ++i)
               batch.push_back({caches[static_cast<std::size_t>(i)], qv.slice(i, 1), kv.slice(i, 1), vv.slice(i, 1), ov.slice(i, 1)});
             a.guarded(caches, [&] { a.impl->decode(batch); });
             return result;
           },
           py::arg("caches"), py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("out") = py::none(),
           "One token of each of B sequences in one call: q [B, H_q, d], k and v [B, H_kv, d], row i for caches[i]; returns out "
           "[B, H_q, d]. Each sequence gets the bits of decode() on its own.")
      .def("save_caches", [](const py_attention& a, const std::string& path, const std::vector<kv_cache*>& caches) { a.impl->save(path, caches); },
           py::arg("path"), py::arg("caches"),
           "Saves the caches (of this layer) to one file, replaced whole (docs/embedding.md, cache files).")
      .def("load_caches", [](const py_attention& a, const std::string& path, std::int64_t reserve) { return a.impl->load(path, reserve); },
           py::arg("path"), py::kw_only(), py::arg("reserve") = 0,
           "Every cache of a file saved by save_caches() of a layer like this one, each with room for `reserve` tokens. "
           "Raises FileError naming what is wrong.")
      .def("_decode_loop", [](py_attention& a, kv_cache& cache, const py::array& q, const py::array& k, const py::array& v, py::array& out) {
             // The same decode calls made from C++, timed there: the measure of a Python call's overhead (examples/python/overhead.py).
             const auto qv = view_of<const float>(q, "q"), kv = view_of<const float>(k, "k"), vv = view_of<const float>(v, "v");
             const auto ov = view_of<float>(out, "out");
             py::gil_scoped_release unlocked;
             const auto start = std::chrono::steady_clock::now();
             for (std::ptrdiff_t t = 0; t < qv.tokens(); ++t)
               a.impl->prefill(cache, {qv.at(t, 0), 1, qv.heads(), qv.head_dim()}, {kv.at(t, 0), 1, kv.heads(), kv.head_dim()},
                               {vv.at(t, 0), 1, vv.heads(), vv.head_dim()}, {ov.at(t, 0), 1, ov.heads(), ov.head_dim()}, {});
             return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
           },
           py::arg("cache"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
           "Decodes the T tokens one call each from C++; returns the seconds they took (for measuring a Python call's overhead).")
      .def("choice_fidelity",
           [](const py_attention& a, const kv_cache& cache, int head, std::int64_t position,
              const py::array_t<float, py::array::c_style | py::array::forcecast>& query, std::int64_t first, std::int64_t end,
              const py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>& reference,
              const py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>& choice, int offset_chunks) {
             const attention_config& c = a.impl->config();
             if (query.ndim() != 1 || query.shape(0) != c.head_dim)
               throw shape_error("choice_fidelity: query must be [head_dim = " + std::to_string(c.head_dim) + "] (before RoPE), got " +
                                 shape_string(query));
             if (reference.ndim() != 1 || choice.ndim() != 1) throw shape_error("choice_fidelity: reference and choice must be 1-D chunk ids");
             const choice_fidelity f = measure_choice(cache, a.impl->rotary(), c, {head, position, query.data(), first, end, offset_chunks},
                                                      {reference.data(), static_cast<std::size_t>(reference.size())},
                                                      {choice.data(), static_cast<std::size_t>(choice.size())});
             py::dict d;
             d["recall"] = f.recall;
             d["mass_recall"] = f.mass_recall;
             d["output_difference"] = f.output_difference;
             return d;
           },
           py::arg("cache"), py::arg("head"), py::arg("position"), py::arg("query"), py::arg("first"), py::arg("end"), py::arg("reference"),
           py::arg("choice"), py::kw_only(), py::arg("offset_chunks") = 1,
           "How much `choice` (chunk ids in [first, end)) loses against `reference` for the pre-RoPE query of `head` at `position` "
           "on this layer's cache: {recall, mass_recall, output_difference} (selection_fidelity.hpp, docs/results.md).")
      .def("ingest", [](py_attention& a, kv_cache& cache, const py::array& q, const py::array& k, const py::array& v) {
             const auto qv = view_of<const float>(q, "q"), kv = view_of<const float>(k, "k"), vv = view_of<const float>(v, "v");
             a.guarded(cache, [&] { a.impl->ingest(cache, qv, kv, vv); });
           },
           py::arg("cache"), py::arg("q"), py::arg("k"), py::arg("v"), "Appends T tokens without computing their attention.");

  m.def("policies", [] { return llama2c::policies::names(); }, "The policy set names Attention(policy=...) accepts.");
}
