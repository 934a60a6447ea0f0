// radam_dist's one-pass CPU kernels: a dense RAdam step and Lookahead's synchronisation (see
// radam_dist/native/__init__.py).
//
// Why it exists: XLA:CPU compiles radam_math.apply_dense into three loops (m, v, then the
// variable): 48 bytes of memory traffic per float32 parameter, where one loop needs 28 (read
// var, grad, m, v; write var, m, v). radam_math.py stays the specification: this loop is
// radam_math.apply_dense operation by operation, each product and sum rounded on its own.
// It must be compiled with -ffp-contract=off (no fused multiply-adds) and without
// -ffast-math; then its results are bit for bit those of TF's kernels and of the XLA path
// (tests/test_native_kernel.py). The step scalars (learning rate, corrections,
// rectification) come in as 0-d tensors computed by radam_math.step_scalars.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_join.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/util/work_sharder.h"

namespace radam_dist {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::Var;

// The inputs and attributes of a step that both ops take after their first input (the
// variable, or the rows): the slots, the gradient's parts and the step scalars.
#define RADAM_DIST_STEP_INPUTS                 \
    .Input("m: resource")                      \
    .Input("v: resource")                      \
    .Input("vhat: num_vhat * resource")        \
    .Input("grads: num_parts * T")             \
    .Input("lr: T")                            \
    .Input("weight_decay: T")                  \
    .Input("beta_1: T")                        \
    .Input("one_minus_beta_1: T")              \
    .Input("beta_2: T")                        \
    .Input("one_minus_beta_2: T")              \
    .Input("m_correction: T")                  \
    .Input("v_correction: T")                  \
    .Input("r_t: T")                           \
    .Input("rectified: bool")                  \
    .Input("epsilon: T")
#define RADAM_DIST_STEP_ATTRS                  \
    .Attr("T: {float, double}")                \
    .Attr("num_vhat: int >= 0 = 0")            \
    .Attr("num_parts: int >= 1 = 1")           \
    .Attr("has_weight_decay: bool = true")

REGISTER_OP("RadamDistApplyDense")
    .Input("var: resource")
    RADAM_DIST_STEP_INPUTS
    RADAM_DIST_STEP_ATTRS
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext*) {
      return absl::OkStatus();
    })
    .Doc(R"doc(
One RAdam step on var, m, v (and vhat, for amsgrad) in place, in one pass over memory:
radam_math.apply_dense. grads are the replicas' parts of the gradient, added left to right.
)doc");

REGISTER_OP("RadamDistApplyDenseRows")
    .Input("rows: T")
    RADAM_DIST_STEP_INPUTS
    .Output("new_rows: T")
    RADAM_DIST_STEP_ATTRS
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc(R"doc(
RadamDistApplyDense on a tensor that is no variable (a ZeRO replica's rows of one): m, v
(and vhat) are updated in place, the rows' new values are the output.
)doc");

REGISTER_OP("RadamDistLookaheadPullBack")
    .Input("var: resource")
    .Input("slow: resource")
    .Input("alpha: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext*) {
      return absl::OkStatus();
    })
    .Doc(R"doc(
Lookahead's synchronisation in place, in one pass: slow += alpha * (var - slow); var = slow
(radam_math.lookahead_pull_back).
)doc");

constexpr int kNumScalars = 11;  // lr ... epsilon, in the order of the inputs above

template <typename T>
struct Scalars {
  T lr, weight_decay, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, m_correction,
      v_correction, r_t;
  bool rectified;
  T epsilon;
};

template <typename T>
struct Arrays {
  std::vector<const T*> parts;
  T* var;
  T* m;
  T* v;
  T* vhat;  // null without amsgrad
};

// max with NaN propagated, as TF's Maximum kernel and XLA's max do.
template <typename T>
inline T MaxPropagatingNaN(T a, T b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a < b ? b : a;
}

// radam_math.apply_dense on `count` elements. The variant is a template, so that each loop
// vectorizes without branches; the pointers are __restrict parameters, which GCC honours
// (on local variables it ignores the qualifier and checks for overlap at run time instead,
// which it gives up beyond a few arrays).
template <typename T, bool kVhat, bool kRectified, bool kDecay>
void UpdateElements(int64_t count, const T* __restrict g, T* __restrict var, T* __restrict m,
                    T* __restrict v, T* __restrict vhat, const Scalars<T> s) {
  for (int64_t i = 0; i < count; ++i) {
    const T m_t = s.beta_1 * m[i] + s.one_minus_beta_1 * g[i];
    T v_t = s.beta_2 * v[i] + s.one_minus_beta_2 * (g[i] * g[i]);
    m[i] = m_t;
    v[i] = v_t;
    if (kVhat) {
      v_t = MaxPropagatingNaN(vhat[i], v_t);
      vhat[i] = v_t;
    }
    const T m_corr = m_t * s.m_correction;
    T update = m_corr;
    if (kRectified) update = s.r_t * m_corr / (std::sqrt(v_t * s.v_correction) + s.epsilon);
    if (kDecay) update = update + s.weight_decay * var[i];
    var[i] = var[i] - s.lr * update;
  }
}

template <typename T>
void AddInto(int64_t count, T* __restrict total, const T* __restrict part) {
  for (int64_t i = 0; i < count; ++i) total[i] = total[i] + part[i];
}

// Elements [begin, end). Several gradient parts are added left to right (as
// radam_math.sum_in_replica_order adds them) tile by tile into a buffer that stays in the
// L1 cache, so that memory sees each part read once and no sum written.
template <typename T, bool kVhat, bool kRectified, bool kDecay>
void UpdateRange(const Arrays<T>& a, const Scalars<T>& s, int64_t begin, int64_t end) {
  auto at = [begin](T* p) { return p == nullptr ? nullptr : p + begin; };
  if (a.parts.size() == 1) {
    UpdateElements<T, kVhat, kRectified, kDecay>(end - begin, a.parts[0] + begin, at(a.var),
                                                 at(a.m), at(a.v), at(a.vhat), s);
    return;
  }
  constexpr int64_t kTile = 2048;
  alignas(64) T total[kTile];
  for (int64_t first = begin; first < end; first += kTile) {
    const int64_t count = std::min(kTile, end - first);
    std::memcpy(total, a.parts[0] + first, count * sizeof(T));
    for (size_t k = 1; k < a.parts.size(); ++k) AddInto(count, total, a.parts[k] + first);
    UpdateElements<T, kVhat, kRectified, kDecay>(
        count, total, a.var + first, a.m + first, a.v + first,
        a.vhat == nullptr ? nullptr : a.vhat + first, s);
  }
}

template <typename T>
using RangeFn = void (*)(const Arrays<T>&, const Scalars<T>&, int64_t, int64_t);

template <typename T, bool kVhat, bool kRectified>
RangeFn<T> ChooseDecay(bool decay) {
  return decay ? UpdateRange<T, kVhat, kRectified, true> : UpdateRange<T, kVhat, kRectified, false>;
}

template <typename T, bool kVhat>
RangeFn<T> ChooseRectified(bool rectified, bool decay) {
  return rectified ? ChooseDecay<T, kVhat, true>(decay) : ChooseDecay<T, kVhat, false>(decay);
}

template <typename T>
RangeFn<T> Choose(bool vhat, bool rectified, bool decay) {
  return vhat ? ChooseRectified<T, true>(rectified, decay)
              : ChooseRectified<T, false>(rectified, decay);
}

// Copy-on-write, as TF's own training ops do (PrepareToUpdateVariable): a tensor read from
// the variable earlier may still hold its buffer, and must keep the old values.
absl::Status PrepareToUpdate(OpKernelContext* ctx, Var* var) {
  Tensor* tensor = var->tensor();
  if (!var->copy_on_read_mode.load() && tensor->RefCountIsOne()) return absl::OkStatus();
  Tensor copy;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensor->dtype(), tensor->shape(), &copy));
  std::memcpy(copy.data(), tensor->data(), tensor->TotalBytes());
  *tensor = copy;
  return absl::OkStatus();
}

// Elements [0, n) in blocks of 32,768 across the device's intra-op threads (inline where the
// device has none): work(begin, end) for each shard.
template <typename Work>
void InBlocks(OpKernelContext* ctx, int64_t n, int64_t cycles_per_element, const Work& work) {
  constexpr int64_t kBlock = 1 << 15;
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  if (workers == nullptr || workers->workers == nullptr) {
    work(0, n);
    return;
  }
  tensorflow::Shard(workers->num_threads, workers->workers, (n + kBlock - 1) / kBlock,
                    kBlock * cycles_per_element, [&](int64_t first, int64_t last) {
                      work(first * kBlock, std::min(n, last * kBlock));
                    });
}

// The resource variables of inputs [first_input, first_input + names.size()), looked up, distinct, locked
// exclusively in address order (as TF's training ops lock theirs), and checked: initialized,
// of dtype T, of `shape` (null: the first variable's). `against` names what the dtype and
// shape are compared with.
template <typename T>
class LockedVariables {
 public:
  LockedVariables(OpKernelContext* ctx, const char* op, std::vector<const char*> names,
                  const tensorflow::TensorShape* shape, const char* against, int first_input = 0) {
    vars_.resize(names.size());
    for (size_t i = 0; i < names.size(); ++i) {
      status_ = tensorflow::LookupResource(
          ctx, tensorflow::HandleFromInput(ctx, first_input + static_cast<int>(i)), &vars_[i]);
      if (!status_.ok()) return;
    }
    std::vector<Var*> order;
    for (auto& var : vars_) order.push_back(var.get());
    std::sort(order.begin(), order.end());
    if (std::adjacent_find(order.begin(), order.end()) != order.end()) {
      status_ = absl::InvalidArgumentError(
          absl::StrCat(op, ": ", absl::StrJoin(names, ", "), " must be different variables"));
      return;
    }
    locks_.reserve(order.size());
    for (Var* var : order) locks_.emplace_back(*var->mu());
    shape_ = shape != nullptr ? *shape : vars_[0]->tensor()->shape();
    const tensorflow::DataType dtype = tensorflow::DataTypeToEnum<T>::value;
    for (size_t i = 0; i < names.size(); ++i) {
      const Tensor* tensor = vars_[i]->tensor();
      if (!vars_[i]->is_initialized) {
        status_ = absl::FailedPreconditionError(
            absl::StrCat(op, ": ", names[i], " is not initialized"));
      } else if (tensor->dtype() != dtype) {
        status_ = absl::InvalidArgumentError(absl::StrCat(
            op, ": ", names[i], " has dtype ", tensorflow::DataTypeString(tensor->dtype()),
            ", ", against, " ", tensorflow::DataTypeString(dtype)));
      } else if (tensor->shape() != shape_) {
        status_ = absl::InvalidArgumentError(absl::StrCat(
            op, ": ", names[i], " has shape ", tensor->shape().DebugString(), ", ", against,
            " ", shape_.DebugString()));
      }
      if (!status_.ok()) return;
    }
  }

  const absl::Status& status() const { return status_; }
  const tensorflow::TensorShape& shape() const { return shape_; }

  // Copy-on-write for every variable, then the data of variable i.
  absl::Status PrepareToUpdate(OpKernelContext* ctx) {
    for (auto& var : vars_) TF_RETURN_IF_ERROR(radam_dist::PrepareToUpdate(ctx, var.get()));
    return absl::OkStatus();
  }
  T* data(int i) { return vars_[i]->tensor()->template flat<T>().data(); }

 private:
  std::vector<tensorflow::core::RefCountPtr<Var>> vars_;
  std::vector<tensorflow::mutex_lock> locks_;
  tensorflow::TensorShape shape_;
  absl::Status status_;
};

// RadamDistApplyDense (kRows false): var is input 0, a resource variable updated in place.
// RadamDistApplyDenseRows (kRows true): input 0 is a tensor of rows; the output starts as their
// copy, block by block (so each block is copied while it is in cache), and is updated in place.
template <typename T, bool kRows>
class ApplyDenseOp : public OpKernel {
 public:
  explicit ApplyDenseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_vhat", &num_vhat_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_parts", &num_parts_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_weight_decay", &has_weight_decay_));
    OP_REQUIRES(ctx, num_vhat_ <= 1,
                absl::InvalidArgumentError(absl::StrCat(kName, ": num_vhat must be 0 or 1")));
  }

  void Compute(OpKernelContext* ctx) override {
    // The resource inputs come first: var (not for rows), m, v, vhat.
    const int first_variable = kRows ? 1 : 0;
    const int num_vars = 2 + (kRows ? 0 : 1) + num_vhat_;
    const int first_part = first_variable + num_vars;
    const tensorflow::TensorShape& shape = ctx->input(first_part).shape();
    std::vector<const char*> names = {"var", "m", "v", "vhat"};
    if (kRows) names.erase(names.begin());
    names.resize(num_vars);
    if (kRows) {
      OP_REQUIRES(ctx, ctx->input(0).shape() == shape,
                  absl::InvalidArgumentError(absl::StrCat(
                      kName, ": rows have shape ", ctx->input(0).shape().DebugString(),
                      ", the gradient ", shape.DebugString())));
    }
    LockedVariables<T> vars(ctx, kName, names, &shape, "the gradient", first_variable);
    OP_REQUIRES_OK(ctx, vars.status());
    Arrays<T> arrays;
    for (int k = 0; k < num_parts_; ++k) {
      const Tensor& part = ctx->input(first_part + k);
      OP_REQUIRES(ctx, part.shape() == shape,
                  absl::InvalidArgumentError(absl::StrCat(
                      kName, ": gradient part ", k, " has shape ",
                      part.shape().DebugString(), ", part 0 ", shape.DebugString())));
      arrays.parts.push_back(part.flat<T>().data());
    }
    const int first_scalar = first_part + num_parts_;
    for (int j = 0; j < kNumScalars; ++j) {
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(first_scalar + j).shape()),
                  absl::InvalidArgumentError(absl::StrCat(
                      kName, ": step scalar ", j, " is not a scalar")));
    }
    auto scalar = [&](int j) { return ctx->input(first_scalar + j).scalar<T>()(); };
    const Scalars<T> s{scalar(0), scalar(1), scalar(2), scalar(3), scalar(4), scalar(5),
                       scalar(6), scalar(7), scalar(8),
                       ctx->input(first_scalar + 9).scalar<bool>()(), scalar(10)};
    const T* rows = nullptr;
    if (kRows) {
      Tensor* out = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
      rows = ctx->input(0).flat<T>().data();
      arrays.var = out->flat<T>().data();
    }
    // Only now, with every input checked, is anything written.
    OP_REQUIRES_OK(ctx, vars.PrepareToUpdate(ctx));
    int next = 0;
    if (!kRows) arrays.var = vars.data(next++);
    arrays.m = vars.data(next++);
    arrays.v = vars.data(next++);
    arrays.vhat = num_vhat_ ? vars.data(next) : nullptr;

    const RangeFn<T> update = Choose<T>(num_vhat_ > 0, s.rectified, has_weight_decay_);
    InBlocks(ctx, shape.num_elements(), /*cycles_per_element=*/20,
             [&](int64_t begin, int64_t end) {
               if (kRows) std::memcpy(arrays.var + begin, rows + begin, (end - begin) * sizeof(T));
               update(arrays, s, begin, end);
             });
  }

 private:
  static constexpr const char* kName = kRows ? "RadamDistApplyDenseRows" : "RadamDistApplyDense";
  int num_vhat_ = 0;
  int num_parts_ = 1;
  bool has_weight_decay_ = true;
};

template <typename T>
void PullBackElements(int64_t count, T* __restrict var, T* __restrict slow, const T alpha) {
  for (int64_t i = 0; i < count; ++i) {
    const T step_back = slow[i] + alpha * (var[i] - slow[i]);
    slow[i] = step_back;
    var[i] = step_back;
  }
}

template <typename T>
class PullBackOp : public OpKernel {
 public:
  explicit PullBackOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(2).shape()),
                absl::InvalidArgumentError("RadamDistLookaheadPullBack: alpha is not a scalar"));
    LockedVariables<T> vars(ctx, "RadamDistLookaheadPullBack", {"var", "slow"},
                            /*shape=*/nullptr, "var");
    OP_REQUIRES_OK(ctx, vars.status());
    const T alpha = ctx->input(2).scalar<T>()();
    OP_REQUIRES_OK(ctx, vars.PrepareToUpdate(ctx));
    T* var = vars.data(0);
    T* slow = vars.data(1);
    InBlocks(ctx, vars.shape().num_elements(), /*cycles_per_element=*/4,
             [&](int64_t begin, int64_t end) {
               PullBackElements(end - begin, var + begin, slow + begin, alpha);
             });
  }
};

#define RADAM_DIST_REGISTER(T)                                                        \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("RadamDistApplyDense").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      ApplyDenseOp<T, false>);                                                          \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("RadamDistApplyDenseRows").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      ApplyDenseOp<T, true>);
RADAM_DIST_REGISTER(float)
RADAM_DIST_REGISTER(double)
#undef RADAM_DIST_REGISTER

#define RADAM_DIST_REGISTER(T)                                                       \
  REGISTER_KERNEL_BUILDER(Name("RadamDistLookaheadPullBack")                         \
                              .Device(tensorflow::DEVICE_CPU)                        \
                              .TypeConstraint<T>("T"),                               \
                          PullBackOp<T>);
RADAM_DIST_REGISTER(float)
RADAM_DIST_REGISTER(double)
#undef RADAM_DIST_REGISTER

}  // namespace
}  // namespace radam_dist
