// The CPU SageBinaryGemm: argument checks, the thread pool, and the blocked decode-then-multiply loop.
//
// Work is split over blocks of kBlockRows output rows. A thread decodes its block's rows of Ŵ into a float
// buffer (binary part r_n·(±α) by the ISA kernel, then the salient values written over it, exactly as the
// contract's decoder does: contract v3, docs/sage_binary_gemm.md), and multiplies every row of X by it. Each
// weight is decoded once per call, whatever M is, and nothing of the size of Ŵ is ever held.
#include "sage_cpu.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "half.h"
#include "kernels.h"

#if defined(SAGE_CPU_X86)
#include <immintrin.h>
#endif

namespace sage_cpu {
namespace {

constexpr int kBlockRows = 32;  // rows of Y per task: a multiple of every kernel's nr
// Below this many multiply-adds a call runs on the calling thread alone. Measured on a shared 2-core machine, a
// decode-step call of a small model (M = 1, under a million weights, 50-150 us) ran slower when split: waking a
// worker, and waiting for one the OS had descheduled, cost more than the half of the work it took.
constexpr int64_t kParallelMacs = int64_t{1} << 21;

// ------------------------------------------------------------------------------------------- kernel choice

IsaKernels choose_kernels() {
  const char* forced = std::getenv("SAGE_CPU_ISA");
  const std::string want = forced ? forced : "";
#if defined(SAGE_CPU_X86)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512")) return avx512_kernels();
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return avx2_kernels();
#endif
  return portable_kernels();
}

const IsaKernels& kernels() {
  static const IsaKernels chosen = choose_kernels();
  return chosen;
}

// ------------------------------------------------------------------------------------------- thread pool

int default_threads() {
  if (const char* env = std::getenv("SAGE_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, 256);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

inline void cpu_relax() {
#if defined(SAGE_CPU_X86)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// A fixed set of workers that run `fn(task)` for tasks handed out one at a time; the calling thread works too and
// returns when every task is done, without waiting for a worker that never got to start: on a shared machine a
// descheduled worker must not stall the call (the caller then simply runs all the tasks itself). Workers spin
// briefly after a job (the next layer's call usually follows within microseconds) and then sleep on a condition
// variable, so an idle session costs no CPU.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_run(run_mu_);  // two sessions may call at once: one job at a time
    Job job{&fn, tasks};
    if (!workers_.empty() && tasks > 1) {
      job_.store(&job);
      {
        std::lock_guard<std::mutex> lock(mu_);
        generation_.fetch_add(1);
      }
      cv_.notify_all();
    }
    work(job);
    while (job.done.load() < tasks) cpu_relax();  // a worker is finishing a task it took
    job_.store(nullptr);
    while (users_.load() > 0) cpu_relax();  // nobody may still hold `job`, which lives on this stack
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };

  static void work(Job& job) {
    for (int64_t t = job.next.fetch_add(1); t < job.tasks; t = job.next.fetch_add(1)) {
      (*job.fn)(t);
      job.done.fetch_add(1);
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load() == seen && std::chrono::steady_clock::now() < spin_until)
        for (int i = 0; i < 32; ++i) cpu_relax();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      users_.fetch_add(1);  // before reading job_: run() clears job_ and then waits for users_ to drop to 0
      if (Job* job = job_.load()) work(*job);
      users_.fetch_sub(1);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> users_{0};
};

Pool& pool() {
  // Never destroyed: its workers sleep until the process ends (the library is linked -z nodelete, so an
  // unloading ONNX Runtime session cannot pull the code from under them).
  static Pool* p = new Pool(default_threads());
  return *p;
}

// ------------------------------------------------------------------------------------------- checks

int fail(char* err, int64_t err_len, const std::string& msg) {
  if (err && err_len > 0) {
    const size_t n = std::min<size_t>(msg.size(), static_cast<size_t>(err_len - 1));
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
  }
  return 1;
}

int planes_for(int64_t groups) {
  int p = 0;
  while ((int64_t{1} << p) < groups) ++p;
  return p;
}

std::string check_attrs(int64_t k, int64_t n, int64_t g, int64_t b) {
  if (k < 1 || k > SAGE_CPU_MAX_IN_FEATURES || n < 1 || n > SAGE_CPU_MAX_FEATURES)
    return "in_features and out_features must lie in 1.." + std::to_string(SAGE_CPU_MAX_IN_FEATURES) + " and 1.." +
           std::to_string(SAGE_CPU_MAX_FEATURES) + ", got K=" + std::to_string(k) + ", N=" + std::to_string(n);
  if (g < 1 || g > SAGE_CPU_MAX_GROUPS)
    return "n_groups must lie in 1.." + std::to_string(SAGE_CPU_MAX_GROUPS) + ", got " + std::to_string(g);
  if (b < 2 || b > 8) return "salient_bits must lie in 2..8, got " + std::to_string(b);
  return "";
}

std::string check_pointers(const SageCpuArgs& a) {
  // row_scales may be null (every r_n is 1)
  if (!a.x || !a.y || !a.sign_bits || !a.group_scales || !a.salient_rowptr || !a.salient_scale)
    return "a required tensor is missing";
  if (planes_for(a.n_groups) > 0 && !a.group_codes) return "group_codes is missing";
  if (a.nnz < 0) return "nnz must be >= 0";
  if (a.nnz > 0 && (!a.salient_cols || !a.salient_q)) return "salient_cols or salient_q is missing";
  if (a.m < 0) return "X has a negative row count";
  if (a.x_dtype != SAGE_CPU_FLOAT32 && a.x_dtype != SAGE_CPU_FLOAT16) return "X must be float32 or float16";
  return "";
}

// First bad salient entry seen by any thread (entries are checked where they are applied).
struct BadEntry {
  std::atomic<int64_t> index{-1};
  void record(int64_t e) {
    int64_t none = -1;
    index.compare_exchange_strong(none, e);
  }
};

// ------------------------------------------------------------------------------------------- one call

struct Call {
  const SageCpuArgs& a;
  const IsaKernels& isa;
  DecodeView view;
  int64_t kv;        // padded row length, a multiple of 16
  const float* x;    // [m, kv], zero padded
  float* y;          // [m, n] float32
  BadEntry* bad;
  bool fused;        // gemv_binary + salient_correction instead of decode_rows + gemm

  // fn(col, value) for each valid salient entry of `row`. The CSR list is clamped as the CUDA kernels clamp it (a
  // bad rowptr can only lose entries, never read outside the arrays); an entry whose column or q is out of range
  // is recorded as the call's error and skipped.
  template <class Fn>
  void for_each_salient(int64_t row, Fn fn) const {
    const int limit = (1 << (a.salient_bits - 1)) - 1;
    const int64_t lo = std::clamp<int64_t>(a.salient_rowptr[row], 0, a.nnz);
    const int64_t hi = std::clamp<int64_t>(a.salient_rowptr[row + 1], lo, a.nnz);
    const float scale = half_to_float(a.salient_scale[row]);
    for (int64_t e = lo; e < hi; ++e) {
      const int32_t col = a.salient_cols[e];  // unsigned 16-bit: never negative
      const int q = a.salient_q[e];
      if (col >= a.k || q > limit || q < -limit) {
        bad->record(e);
        continue;
      }
      fn(col, scale * static_cast<float>(q));
    }
  }

  // The salient values written over the decoded binary rows.
  void salient_rows(int64_t n0, int rows, float* w) const {
    for (int r = 0; r < rows; ++r)
      for_each_salient(n0 + r, [&](int32_t col, float value) { w[r * kv + col] = value; });
  }

  // The ±α value the bitmaps give weight (row, col), as the decoders compute it.
  float binary_value(int64_t row, int64_t col) const {
    const int64_t byte = row * view.bytes + col / 8;
    const int bit = static_cast<int>(col % 8);
    int g = 0;
    for (int p = 0; p < view.planes; ++p) g |= ((view.group_codes[p * a.n * view.bytes + byte] >> bit) & 1) << p;
    return ((view.sign_bits[byte] >> bit) & 1) ? view.table[g] : -view.table[g];
  }

  // After gemv_binary: each salient entry adds (its value − the binary value r_n·(±α) counted there) · x.
  void salient_correction(int64_t n0, int rows, const float* row_scale) const {
    for (int64_t row = n0; row < n0 + rows; ++row)
      for_each_salient(row, [&](int32_t col, float value) {
        const float binary = binary_value(row, col);
        const float delta = value - (row_scale ? row_scale[row - n0] * binary : binary);
        for (int64_t i = 0; i < a.m; ++i) y[i * a.n + row] += delta * x[i * kv + col];
      });
  }

  // One task: kBlockRows rows of Y. Decode steps (m <= kFusedMaxM) use the fused kernel where there is one;
  // otherwise slices of the kernel's nr rows are decoded just before they are used, so that the slice of Ŵ is
  // still in L1/L2 when the multiplication reads it.
  // r_n of every row of the block goes to the kernels in float32, or null where row_scales is empty (every r_n
  // is 1, contract v3): the kernels then multiply nothing.
  void block(int64_t b, std::vector<float>& w) const {
    const int64_t block_start = b * kBlockRows;
    const int64_t block_end = std::min<int64_t>((b + 1) * kBlockRows, a.n);
    const int block_rows = static_cast<int>(block_end - block_start);
    float scales[kBlockRows];
    const float* row_scale = a.row_scales ? scales : nullptr;
    bool finite_rows = true;
    for (int r = 0; row_scale && r < block_rows; ++r) {
      scales[r] = half_to_float(a.row_scales[block_start + r]);
      finite_rows = finite_rows && std::isfinite(scales[r]);
    }
    // The fused kernel factors r_n out of a sum that counts the salient positions' binary values too, which the
    // correction then takes back out: exact only for a finite r_n (a non-finite one decodes, as the reference).
    if (fused && finite_rows) {
      for (int64_t i = 0; i < a.m; i += kFusedMaxM)
        isa.gemv_binary(view, block_start, block_rows, row_scale, x + i * kv, std::min<int64_t>(kFusedMaxM, a.m - i),
                        kv, kv, y + i * a.n + block_start, a.n);
      salient_correction(block_start, block_rows, row_scale);
      return;
    }
    w.resize(static_cast<size_t>(isa.nr * kv));
    for (int64_t n0 = block_start; n0 < block_end; n0 += isa.nr) {
      const int rows = static_cast<int>(std::min<int64_t>(isa.nr, block_end - n0));
      isa.decode_rows(view, n0, rows, row_scale ? row_scale + (n0 - block_start) : nullptr, w.data(), kv);
      salient_rows(n0, rows, w.data());
      for (int r = 0; r < rows; ++r) std::fill(w.data() + r * kv + a.k, w.data() + (r + 1) * kv, 0.0f);
      std::fill(w.data() + rows * kv, w.data() + isa.nr * kv, 0.0f);
      isa.gemm(x, a.m, kv, w.data(), kv, kv, y + n0, a.n, rows);
    }
  }
};

void load_x(const SageCpuArgs& a, int64_t kv, std::vector<float>& xf) {
  xf.assign(static_cast<size_t>(a.m * kv), 0.0f);
  for (int64_t i = 0; i < a.m; ++i) {
    float* dst = xf.data() + i * kv;
    if (a.x_dtype == SAGE_CPU_FLOAT32) {
      std::memcpy(dst, static_cast<const float*>(a.x) + i * a.k, sizeof(float) * a.k);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(a.x) + i * a.k;
      for (int64_t c = 0; c < a.k; ++c) dst[c] = half_to_float(src[c]);
    }
  }
}

void store_y(const SageCpuArgs& a, const float* yf) {
  const int64_t total = a.m * a.n;
  if (a.x_dtype == SAGE_CPU_FLOAT32) {
    float* y = static_cast<float*>(a.y);
    if (y != yf) std::memcpy(y, yf, sizeof(float) * total);
    if (a.bias)
      for (int64_t i = 0; i < total; ++i) y[i] += a.bias[i % a.n];
    return;
  }
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int64_t i = 0; i < total; ++i) y[i] = float_to_half(yf[i] + (a.bias ? a.bias[i % a.n] : 0.0f));
}

}  // namespace

int gemm(const SageCpuArgs* args, char* err, int64_t err_len);

}  // namespace sage_cpu

extern "C" {

int sage_cpu_check_attrs(int64_t k, int64_t n, int64_t n_groups, int64_t salient_bits, char* err, int64_t err_len) {
  const std::string msg = sage_cpu::check_attrs(k, n, n_groups, salient_bits);
  return msg.empty() ? 0 : sage_cpu::fail(err, err_len, msg);
}

int sage_cpu_gemm(const SageCpuArgs* args, char* err, int64_t err_len) {
  try {
    return sage_cpu::gemm(args, err, err_len);
  } catch (const std::bad_alloc&) {  // X or Y in float32 did not fit
    return sage_cpu::fail(err, err_len, "out of memory");
  }
}

}  // extern "C"

namespace sage_cpu {

int gemm(const SageCpuArgs* args, char* err, int64_t err_len) {
  if (!args) return fail(err, err_len, "no arguments");
  const SageCpuArgs& a = *args;
  std::string msg = check_attrs(a.k, a.n, a.n_groups, a.salient_bits);
  if (msg.empty()) msg = check_pointers(a);
  if (!msg.empty()) return fail(err, err_len, msg);
  if (a.m == 0) return 0;

  float table[16];
  for (int g = 0; g < 16; ++g) table[g] = half_to_float(a.group_scales[std::min(g, a.n_groups - 1)]);
  const int64_t bytes = (a.k + 7) / 8;
  const int64_t kv = (a.k + 15) / 16 * 16;
  static thread_local std::vector<float> xf, yf;  // reused across calls: no allocation per token
  load_x(a, kv, xf);
  float* y = static_cast<float*>(a.y);
  if (a.x_dtype != SAGE_CPU_FLOAT32) {
    yf.resize(static_cast<size_t>(a.m * a.n));
    y = yf.data();
  }
  BadEntry bad;
  // The fused kernel adds x · (−α_0) at padding columns, where x is 0: exact only for finite scales.
  const bool finite = std::all_of(table, table + 16, [](float v) { return std::isfinite(v); });
  const IsaKernels& isa = kernels();
  const Call call{a, isa, DecodeView{a.sign_bits, a.group_codes, a.n, bytes, planes_for(a.n_groups), table},
                  kv, xf.data(), y, &bad, isa.gemv_binary != nullptr && a.m <= kFusedMaxM && finite};
  const int64_t blocks = (a.n + kBlockRows - 1) / kBlockRows;
  std::atomic<bool> no_memory{false};
  const auto task = [&](int64_t b) {
    static thread_local std::vector<float> w;
    try {  // nothing may unwind through the pool's threads or back into ONNX Runtime
      call.block(b, w);
    } catch (const std::bad_alloc&) {
      no_memory.store(true);
    }
  };
  if (a.m * a.n * static_cast<int64_t>(a.k) < kParallelMacs) {
    for (int64_t b = 0; b < blocks; ++b) task(b);
  } else {
    pool().run(blocks, task);
  }
  if (no_memory.load()) return fail(err, err_len, "out of memory for a slice of the weight");
  const int64_t e = bad.index.load();
  if (e >= 0)
    return fail(err, err_len, "salient entry " + std::to_string(e) + " (column " +
                                  std::to_string(a.salient_cols[e]) + ", q " + std::to_string(a.salient_q[e]) +
                                  ") lies outside [0, K=" + std::to_string(a.k) + ") or beyond |q| <= " +
                                  std::to_string((1 << (a.salient_bits - 1)) - 1));
  store_y(a, y);
  return 0;
}

}  // namespace sage_cpu

extern "C" {

const char* sage_cpu_isa() { return sage_cpu::kernels().name; }
int sage_cpu_threads() { return sage_cpu::pool().threads(); }
int sage_cpu_abi_version() { return SAGE_CPU_ABI_VERSION; }

}  // extern "C"
