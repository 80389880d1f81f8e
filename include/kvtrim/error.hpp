// kvtrim: error reporting.
// Configuration and input errors throw kvtrim::Error with a message that names what was wrong and what was
// expected. Hot paths never return garbage silently: they either succeed or throw before touching state.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kvtrim {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error("kvtrim: " + what) {}
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void throw_error(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}
}  // namespace detail

}  // namespace kvtrim

// KVTRIM_CHECK(cond, "message parts", value, ...): throws kvtrim::Error built from the parts when cond is false.
#define KVTRIM_CHECK(cond, ...)                              \
  do {                                                       \
    if (!(cond)) ::kvtrim::detail::throw_error(__VA_ARGS__); \
  } while (0)
