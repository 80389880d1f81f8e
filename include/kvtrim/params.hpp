// kvtrim: policy parameters by name.
//
// A policy's Params struct lists its fields once, so that every tool can read and set them without knowing
// the policy: the command-line examples (`--param decode.recent=24`), the Python module, CSV metadata.
//
//   struct Params {
//     int sinks = 4;
//     HashProbe probe = HashProbe::kQuery;
//     static constexpr auto fields() { return std::tuple{field("sinks", &Params::sinks),
//                                                        field("probe", &Params::probe)}; }
//   };
//
// Field types: int, std::uint64_t, float, double, bool, std::vector<int> (comma-separated), an enum with an
// `enum_names(E)` function found by argument-dependent lookup (a constexpr array of {value, name}), and a
// nested Params struct (its keys are prefixed: `decode.recent`). A Params without fields() has no settable
// fields. set_param() validates the text (whole string parsed, in range, finite) and throws kvtrim::Error
// naming the key, the value and what was expected; the policy's constructor still checks the combination.
#pragma once

#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"

namespace kvtrim {

template <class S, class T>
struct Field {
  std::string_view name;
  T S::*member;
};

template <class S, class T>
constexpr Field<S, T> field(std::string_view name, T S::*member) {
  return {name, member};
}

template <class E>
struct EnumName {
  E value;
  std::string_view name;
};

template <class S>
constexpr auto fields_of() {
  if constexpr (requires { S::fields(); })
    return S::fields();
  else
    return std::tuple<>{};
}

namespace detail {

// A nested Params struct (any class but the leaf types below); a struct without fields() has no keys.
template <class S>
concept NestedParams = std::is_class_v<S> && !std::is_same_v<S, std::vector<int>>;
template <class E>
concept NamedEnum = std::is_enum_v<E> && requires(E e) { enum_names(e); };

template <class T>
void parse_number(std::string_view key, std::string_view text, T& out) {
  T v{};
  const char* end = text.data() + text.size();
  std::from_chars_result r;
  if constexpr (std::is_floating_point_v<T>)
    r = std::from_chars(text.data(), end, v, std::chars_format::general);
  else
    r = std::from_chars(text.data(), end, v);
  const char* kind = std::is_floating_point_v<T> ? "a number" : std::is_signed_v<T> ? "an integer" : "an unsigned integer";
  KVTRIM_CHECK(!text.empty() && r.ec != std::errc::invalid_argument && r.ptr == end, "parameter ", key, ": '", text,
               "' is not ", kind);
  KVTRIM_CHECK(r.ec != std::errc::result_out_of_range, "parameter ", key, ": ", text, " is out of range (",
               std::numeric_limits<T>::lowest(), "..", std::numeric_limits<T>::max(), ")");
  if constexpr (std::is_floating_point_v<T>)
    KVTRIM_CHECK(std::isfinite(v), "parameter ", key, ": ", text, " is not a finite number");
  out = v;
}

template <class T>
void parse_value(std::string_view key, std::string_view text, T& out) {
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "1" || text == "on") {
      out = true;
    } else if (text == "false" || text == "0" || text == "off") {
      out = false;
    } else {
      throw_error("parameter ", key, ": '", text, "' is not a boolean (true/false, 1/0, on/off)");
    }
  } else if constexpr (NamedEnum<T>) {
    std::string valid;
    for (const auto& [value, name] : enum_names(T{})) {
      if (name == text) {
        out = value;
        return;
      }
      valid += valid.empty() ? "" : ", ";
      valid += name;
    }
    throw_error("parameter ", key, ": '", text, "' is not one of ", valid);
  } else if constexpr (std::is_same_v<T, std::vector<int>>) {
    std::vector<int> v;
    std::size_t start = 0;
    while (start < text.size()) {
      const std::size_t comma = std::min(text.find(',', start), text.size());
      int x = 0;
      parse_number(key, text.substr(start, comma - start), x);
      v.push_back(x);
      start = comma + 1;
      KVTRIM_CHECK(comma + 1 != text.size(), "parameter ", key, ": '", text, "' ends with a comma");
    }
    out = std::move(v);
  } else if constexpr (std::is_arithmetic_v<T>) {
    parse_number(key, text, out);
  } else {
    static_assert(sizeof(T) == 0, "kvtrim: a Params field of this type cannot be set from text");
  }
}

template <class T>
std::string format_value(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (NamedEnum<T>) {
    for (const auto& [value, name] : enum_names(T{}))
      if (value == v) return std::string(name);
    return std::to_string(static_cast<long long>(v));
  } else if constexpr (std::is_same_v<T, std::vector<int>>) {
    std::string s;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i > 0) s += ',';
      s += std::to_string(v[i]);
    }
    return s;
  } else {
    std::ostringstream os;
    os.precision(std::numeric_limits<T>::max_digits10);
    os << v;
    return os.str();
  }
}

// f(key, value&) for every leaf field, keys prefixed with the nested fields' names.
template <class S, class F>
void visit_fields(S& s, std::string_view prefix, F&& f) {
  std::apply(
      [&](const auto&... fld) {
        (
            [&] {
              auto& value = s.*(fld.member);
              const std::string key = prefix.empty() ? std::string(fld.name) : std::string(prefix) + "." + std::string(fld.name);
              if constexpr (NestedParams<std::remove_cvref_t<decltype(value)>>)
                visit_fields(value, key, f);
              else
                f(std::string_view(key), value);
            }(),
            ...);
      },
      fields_of<std::remove_cvref_t<S>>());
}

}  // namespace detail

// Sets one field by its key (nested keys joined by '.'), e.g. set_param(p, "decode.recent", "24").
template <class Params>
void set_param(Params& p, std::string_view key, std::string_view value) {
  bool found = false;
  std::string valid;
  detail::visit_fields(p, "", [&](std::string_view k, auto& field_value) {
    if (k == key) {
      std::remove_cvref_t<decltype(field_value)> parsed = field_value;
      detail::parse_value(key, value, parsed);
      field_value = std::move(parsed);
      found = true;
    }
    valid += valid.empty() ? "" : ", ";
    valid += k;
  });
  KVTRIM_CHECK(found, "unknown parameter '", key, "'; this policy has ",
               valid.empty() ? std::string("no parameters") : "the parameters " + valid);
}

// Sets fields from "key=value" items (e.g. the pieces of "recent=24,sinks=4" split by the caller).
template <class Params>
void set_params(Params& p, const std::vector<std::pair<std::string, std::string>>& items) {
  for (const auto& [k, v] : items) set_param(p, k, v);
}

// Every settable field as (key, value text), in declaration order.
template <class Params>
std::vector<std::pair<std::string, std::string>> list_params(const Params& p) {
  std::vector<std::pair<std::string, std::string>> out;
  detail::visit_fields(p, "", [&](std::string_view k, const auto& v) {
    out.emplace_back(std::string(k), detail::format_value(v));
  });
  return out;
}

// "key=value key=value" (empty for a policy without parameters).
template <class Params>
std::string describe_params(const Params& p) {
  std::string s;
  for (const auto& [k, v] : list_params(p)) s += (s.empty() ? "" : " ") + k + "=" + v;
  return s;
}

}  // namespace kvtrim
