// kvtrim: the slots of one (layer, KV head).
//
// A head keeps `size()` tokens in slots 0..size()-1: key row, value row (stored as T: float, kvtrim::half or
// kvtrim::bfloat16; rows arrive as float and are rounded to nearest even), original position, and the
// policy's per-slot metadata (a trivially copyable struct, e.g. an accumulated score or a hash code).
// Slots are unordered: removal moves the last slot into the hole, so recency must be read from pos(),
// never from the slot index. Positions live apart from key/value storage (llama.cpp's cells idea).
//
// Capacity is budget + 1: during a decode step the new token joins before the policy evicts. A prefill
// longer than that grows the head for the duration of the prompt and shrink_to_budget() returns the memory.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "dtype.hpp"
#include "error.hpp"

namespace kvtrim {

using RowMajorMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Meta, StorageType T = float>
class HeadStore {
  static_assert(std::is_trivially_copyable_v<Meta>,
                "a policy's SlotMeta must be trivially copyable: slots are moved with memcpy");
  static constexpr bool kFloat = std::is_same_v<T, float>;

 public:
  using Storage = T;
  using KeyRows = Eigen::Map<RowMajorMatrixXf>;
  using ConstKeyRows = Eigen::Map<const RowMajorMatrixXf>;
  using Row = Eigen::Map<Eigen::VectorXf>;
  using ConstRow = Eigen::Map<const Eigen::VectorXf>;

  HeadStore() = default;
  HeadStore(int key_dim, int value_dim, int budget) : dk_(key_dim), dv_(value_dim), budget_(budget) {
    reserve(budget + 1);
  }

  int size() const { return n_; }
  int budget() const { return budget_; }
  int capacity() const { return cap_; }
  int key_dim() const { return dk_; }
  int value_dim() const { return dv_; }

  std::int64_t pos(int i) const { return pos_[i]; }
  const std::int64_t* pos_data() const { return pos_.data(); }
  Meta* meta_data() { return meta_.data(); }
  const Meta* meta_data() const { return meta_.data(); }
  Meta& meta(int i) { return meta_[i]; }
  const Meta& meta(int i) const { return meta_[i]; }
  T* key_ptr(int i) { return keys_.data() + static_cast<std::size_t>(i) * dk_; }
  const T* key_ptr(int i) const { return keys_.data() + static_cast<std::size_t>(i) * dk_; }
  T* value_ptr(int i) { return values_.data() + static_cast<std::size_t>(i) * dv_; }
  const T* value_ptr(int i) const { return values_.data() + static_cast<std::size_t>(i) * dv_; }
  const T* key_data() const { return keys_.data(); }
  const T* value_data() const { return values_.data(); }
  // Eigen views of float storage (16-bit rows are read through key_ptr/value_ptr and converted).
  Row key(int i) requires kFloat { return Row(key_ptr(i), dk_); }
  ConstRow key(int i) const requires kFloat { return ConstRow(key_ptr(i), dk_); }
  Row value(int i) requires kFloat { return Row(value_ptr(i), dv_); }
  ConstRow value(int i) const requires kFloat { return ConstRow(value_ptr(i), dv_); }
  ConstKeyRows keys() const requires kFloat { return ConstKeyRows(keys_.data(), n_, dk_); }
  ConstKeyRows values() const requires kFloat { return ConstKeyRows(values_.data(), n_, dv_); }

  // Euclidean norm of the stored key i, in fp32.
  float key_norm(int i) const {
    if constexpr (kFloat) {
      return key(i).norm();
    } else {
      float sq = 0.0f;
      for (const T* k = key_ptr(i); k != key_ptr(i) + dk_; ++k) sq += to_float(*k) * to_float(*k);
      return std::sqrt(sq);
    }
  }
  std::span<const std::int64_t> positions() const { return {pos_.data(), static_cast<std::size_t>(n_)}; }

  // Position of the newest token held (the one just appended during a step), -1 when empty.
  std::int64_t newest_pos() const { return newest_; }

  std::uint64_t evictions() const { return evictions_; }
  std::uint64_t merges() const { return merges_; }

  // Appends a token (fp32 rows, stored as T); returns its slot. Grows only if the caller reserved more (prefill).
  int append(const float* k, const float* v, std::int64_t position) {
    KVTRIM_CHECK(n_ < cap_, "internal: head is full (", n_, " of ", cap_, " slots)");
    const int i = n_++;
    store_row(key_ptr(i), k, dk_);
    store_row(value_ptr(i), v, dv_);
    pos_[i] = position;
    meta_[i] = Meta{};
    newest_ = std::max(newest_, position);
    return i;
  }

  // Evicts slot i (O(d)): the last slot moves into its place.
  void remove(int i) {
    move_last_into(i);
    ++evictions_;
  }
  // Slot i was merged into another slot by the policy (which already updated that slot); now drop it.
  void remove_merged(int i) {
    move_last_into(i);
    ++merges_;
  }

  // Keeps exactly the slots listed (no duplicates); the list is sorted in place and the kept tokens move
  // down to slots 0..k-1 in slot order. Counts the rest as evictions. In place, no allocation.
  void keep_only(std::span<int> keep) {
    std::sort(keep.begin(), keep.end());
    for (std::size_t j = 0; j < keep.size(); ++j)
      KVTRIM_CHECK(keep[j] >= 0 && keep[j] < n_ && (j == 0 || keep[j] != keep[j - 1]),
                   "internal: keep list has an invalid or repeated slot ", keep[j]);
    for (std::size_t j = 0; j < keep.size(); ++j) {
      const int s = keep[j], d = static_cast<int>(j);  // s >= d because the list is sorted and unique
      if (s == d) continue;
      std::memcpy(key_ptr(d), key_ptr(s), sizeof(T) * dk_);
      std::memcpy(value_ptr(d), value_ptr(s), sizeof(T) * dv_);
      pos_[d] = pos_[s];
      meta_[d] = meta_[s];
    }
    evictions_ += static_cast<std::uint64_t>(n_) - keep.size();
    n_ = static_cast<int>(keep.size());
  }

  // Makes room for at least `slots` tokens (prefill of a long prompt). Not used on the decode path.
  void reserve(int slots) {
    if (slots <= cap_) return;
    cap_ = slots;
    keys_.resize(static_cast<std::size_t>(cap_) * dk_);
    values_.resize(static_cast<std::size_t>(cap_) * dv_);
    pos_.resize(static_cast<std::size_t>(cap_));
    meta_.resize(static_cast<std::size_t>(cap_));
  }

  // After a prompt was compressed: give back what a long prefill borrowed.
  void shrink_to_budget() {
    KVTRIM_CHECK(n_ <= budget_, "internal: shrink with ", n_, " tokens over budget ", budget_);
    if (cap_ == budget_ + 1) return;
    cap_ = budget_ + 1;
    keys_.resize(static_cast<std::size_t>(cap_) * dk_);
    values_.resize(static_cast<std::size_t>(cap_) * dv_);
    pos_.resize(static_cast<std::size_t>(cap_));
    meta_.resize(static_cast<std::size_t>(cap_));
    keys_.shrink_to_fit();
    values_.shrink_to_fit();
    pos_.shrink_to_fit();
    meta_.shrink_to_fit();
  }

  // Drops the slots from n on as if they had never been appended (no eviction counted) and restores the newest
  // position: what a speculative verify appended for attention leaves no trace.
  void truncate(int n, std::int64_t newest) {
    KVTRIM_CHECK(n >= 0 && n <= n_, "internal: truncate to ", n, " of ", n_, " slots");
    n_ = n;
    newest_ = newest;
  }

  // Becomes a copy of `o` (same shape; its rows rounded to T); o's eviction and merge counts add to this head's.
  // The CPU backend runs a host prompt stage over fp32 rows, as the CUDA backend does, then stores the result.
  template <StorageType U>
  void assign(const HeadStore<Meta, U>& o) {
    KVTRIM_CHECK(o.key_dim() == dk_ && o.value_dim() == dv_, "internal: assign of a ", o.key_dim(), "/",
                 o.value_dim(), "-wide head to a ", dk_, "/", dv_, "-wide one");
    reserve(o.size());
    n_ = o.size();
    for (int i = 0; i < n_; ++i) {
      for (int e = 0; e < dk_; ++e) key_ptr(i)[e] = from_float<T>(to_float(o.key_ptr(i)[e]));
      for (int e = 0; e < dv_; ++e) value_ptr(i)[e] = from_float<T>(to_float(o.value_ptr(i)[e]));
      pos_[i] = o.pos(i);
      meta_[i] = o.meta(i);
    }
    newest_ = std::max(newest_, o.newest_pos());
    evictions_ += o.evictions();
    merges_ += o.merges();
  }

  void clear() {
    n_ = 0;
    newest_ = -1;
    evictions_ = merges_ = 0;
  }

  // Bytes of the tokens held (key + value + position + metadata), and of the memory reserved for them.
  std::size_t bytes_used() const { return static_cast<std::size_t>(n_) * bytes_per_slot(); }
  std::size_t bytes_reserved() const { return static_cast<std::size_t>(cap_) * bytes_per_slot(); }
  std::size_t bytes_per_slot() const {
    return sizeof(T) * static_cast<std::size_t>(dk_ + dv_) + sizeof(std::int64_t) + sizeof(Meta);
  }

 private:
  static void store_row(T* dst, const float* src, int n) {
    if constexpr (kFloat)
      std::memcpy(dst, src, sizeof(float) * n);
    else
      from_float(src, dst, static_cast<std::size_t>(n));
  }

  void move_last_into(int i) {
    KVTRIM_CHECK(i >= 0 && i < n_, "internal: remove of slot ", i, " outside 0..", n_ - 1);
    const int last = n_ - 1;
    if (i != last) {
      std::memcpy(key_ptr(i), key_ptr(last), sizeof(T) * dk_);
      std::memcpy(value_ptr(i), value_ptr(last), sizeof(T) * dv_);
      pos_[i] = pos_[last];
      meta_[i] = meta_[last];
    }
    --n_;
  }

  int dk_ = 0, dv_ = 0, budget_ = 0, n_ = 0, cap_ = 0;
  std::int64_t newest_ = -1;
  std::vector<T> keys_, values_;
  std::vector<std::int64_t> pos_;
  std::vector<Meta> meta_;
  std::uint64_t evictions_ = 0, merges_ = 0;
};

}  // namespace kvtrim
