// kvtrim: victim selection shared by the policies.
//
// Convention: a policy scores every slot by how much it deserves to stay (higher = keep). The victim is
// the unprotected slot with the lowest score; among equal scores the oldest position goes first, so
// decisions never depend on slot order. NaN cannot reach a score: the cache rejects non-finite inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "error.hpp"
#include "head_store.hpp"
#include "macros.hpp"

namespace kvtrim {

// Tokens that are never evicted: the first `sinks` positions of the sequence and the `recent` newest ones.
struct Protection {
  int sinks = 0;
  int recent = 0;
  KVTRIM_HOST_DEVICE bool protects(std::int64_t pos, std::int64_t newest) const {
    return pos < sinks || pos > newest - recent;
  }
};

// true when slot a should be evicted before slot b.
KVTRIM_HOST_DEVICE inline bool evicts_before(float score_a, std::int64_t pos_a, float score_b,
                                             std::int64_t pos_b) {
  return score_a < score_b || (score_a == score_b && pos_a < pos_b);
}

// The unprotected slot with the lowest score (oldest on ties), or -1 when every slot is protected.
template <class Meta, class ScoreFn>
int lowest_unprotected(const HeadStore<Meta>& h, Protection pr, ScoreFn&& score) {
  const std::int64_t newest = h.newest_pos();
  int best = -1;
  float best_score = 0.0f;
  std::int64_t best_pos = 0;
  for (int i = 0; i < h.size(); ++i) {
    const std::int64_t p = h.pos(i);
    if (pr.protects(p, newest)) continue;
    const float s = score(i);
    if (best < 0 || evicts_before(s, p, best_score, best_pos)) {
      best = i;
      best_score = s;
      best_pos = p;
    }
  }
  return best;
}

// Evicts lowest-scored unprotected slots one at a time until the head is within budget.
template <class Meta, class ScoreFn>
void evict_lowest_until_budget(HeadStore<Meta>& h, Protection pr, ScoreFn&& score, const char* policy) {
  while (h.size() > h.budget()) {
    const int v = lowest_unprotected(h, pr, score);
    KVTRIM_CHECK(v >= 0, policy, ": every token is protected (sinks ", pr.sinks, " + recent ", pr.recent,
                 ") but the budget is ", h.budget());
    h.remove(v);
  }
}

// Keeps the protected slots plus the highest-scored others (newest on ties) up to the budget; used to
// compress a prompt in one pass. `keep` is scratch space (reused, not shrunk).
template <class Meta, class ScoreFn>
void keep_top_scored(HeadStore<Meta>& h, Protection pr, ScoreFn&& score, std::vector<int>& keep,
                     const char* policy) {
  if (h.size() <= h.budget()) return;
  const std::int64_t newest = h.newest_pos();
  keep.clear();
  std::vector<int> candidates;
  candidates.reserve(static_cast<std::size_t>(h.size()));
  for (int i = 0; i < h.size(); ++i) (pr.protects(h.pos(i), newest) ? keep : candidates).push_back(i);
  KVTRIM_CHECK(static_cast<int>(keep.size()) <= h.budget(), policy, ": ", keep.size(),
               " protected tokens (sinks ", pr.sinks, " + recent ", pr.recent, ") exceed the budget ",
               h.budget());
  const std::size_t room = static_cast<std::size_t>(h.budget()) - keep.size();
  std::vector<float> s(static_cast<std::size_t>(h.size()));
  for (int i : candidates) s[i] = score(i);
  auto keeps_before = [&](int a, int b) { return evicts_before(s[b], h.pos(b), s[a], h.pos(a)); };
  if (room < candidates.size()) {
    std::nth_element(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(room),
                     candidates.end(), keeps_before);
    candidates.resize(room);
  }
  keep.insert(keep.end(), candidates.begin(), candidates.end());
  h.keep_only(keep);
}

// Cuts a freshly loaded prompt (token i in slot i) to the sinks (positions < sinks) plus the newest tokens
// that still fit the budget: StreamingLLM-style truncation. `keep` is scratch space.
template <class Meta>
void keep_sinks_and_newest(HeadStore<Meta>& h, int sinks, std::vector<int>& keep) {
  if (h.size() <= h.budget()) return;
  keep.clear();
  int n_sinks = 0;
  for (int i = 0; i < h.size(); ++i) n_sinks += h.pos(i) < sinks ? 1 : 0;
  const int room = h.budget() - n_sinks;
  for (int i = 0; i < h.size(); ++i)
    if (h.pos(i) < sinks || i >= h.size() - room) keep.push_back(i);
  h.keep_only(keep);
}

}  // namespace kvtrim
