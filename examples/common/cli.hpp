// Command lines of the example programs: every option declared once (name, value, help), every value fully
// parsed and range-checked, unknown options listed with the valid ones, and one exit path for errors.
//
//   cli::Parser p("generate", {{"--steps", "N", "tokens to generate (1..seq_len)"}, ...});
//   return cli::run("generate", [&] {
//     for (auto a = p.start(argc, argv); p.next();) {
//       if (p.is("--steps")) steps = p.integer(1, 1 << 20);
//       ...
//     }
//   });
//
// Exit codes: 0 success, 2 a bad command line (cli::UsageError: one line on stderr, "program: message"),
// 3 input files that are missing (cli::MissingInput), 1 anything else that failed (a kvtrim::Error from a
// corrupt file, for example), always as one line on stderr.
#pragma once

#include <kvtrim/error.hpp>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace cli {

inline constexpr int kUsageExit = 2;
inline constexpr int kMissingInputExit = 3;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct MissingInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Option {
  std::string_view name;  // "--steps"
  std::string_view arg;   // "N" (empty: a flag without a value)
  std::string_view help;
};

// A message on one line (newlines in library messages become "; ").
inline std::string one_line(std::string s) {
  for (std::size_t i = 0; (i = s.find('\n', i)) != std::string::npos;) s.replace(i, 1, "; ");
  return s;
}

// Runs body(); maps the exceptions above to their exit codes with one line on stderr.
template <class F>
int run(std::string_view program, F&& body) {
  auto say = [&](const std::string& msg) {
    std::fprintf(stderr, "%.*s: %s\n", static_cast<int>(program.size()), program.data(), one_line(msg).c_str());
  };
  try {
    return body();
  } catch (const UsageError& e) {
    say(std::string(e.what()) + " (see --help)");
    return kUsageExit;
  } catch (const MissingInput& e) {
    say(e.what());
    return kMissingInputExit;
  } catch (const std::exception& e) {
    say(e.what());
    return 1;
  }
}

class Parser {
 public:
  Parser(std::string_view program, std::vector<Option> options, bool positional = false)
      : program_(program), options_(std::move(options)), positional_(positional) {}

  void start(int argc, char** argv) {
    args_.assign(argv + 1, argv + argc);
    i_ = 0;
    cur_.clear();
  }

  // Next argument; false when none is left. Accepts "--opt value" and "--opt=value".
  bool next() {
    if (pending_) throw UsageError("option " + cur_ + " takes no value, got '" + value_ + "'");
    if (i_ >= args_.size()) return false;
    std::string a = args_[i_++];
    value_.clear();
    has_inline_ = false;
    if (a == "--help" || a == "-h") {
      cur_ = "--help";
      is_positional_ = false;
      return true;
    }
    if (a.size() > 2 && a.rfind("--", 0) == 0) {
      const std::size_t eq = a.find('=');
      if (eq != std::string::npos) {
        value_ = a.substr(eq + 1);
        has_inline_ = true;
        a.resize(eq);
      }
      const Option* o = find(a);
      if (o == nullptr) throw UsageError("unknown option '" + a + "'; the options are " + option_list());
      pending_ = has_inline_ && o->arg.empty();
      cur_ = a;
      is_positional_ = false;
      return true;
    }
    if (!positional_ || (a.size() > 1 && a[0] == '-'))
      throw UsageError("unexpected argument '" + a + "'; the options are " + option_list());
    cur_ = a;
    is_positional_ = true;
    return true;
  }

  bool is(std::string_view name) const { return !is_positional_ && cur_ == name; }
  bool positional() const { return is_positional_; }
  const std::string& current() const { return cur_; }

  // The current option's value (the next argument, or the text after '=').
  std::string value() {
    if (has_inline_) {
      has_inline_ = false;
      return value_;
    }
    if (i_ >= args_.size()) throw UsageError("option " + cur_ + " needs a value");
    return args_[i_++];
  }

  // An integer in lo..hi, the whole text parsed.
  long long integer(long long lo, long long hi) { return parse_integer(cur_, value(), lo, hi); }
  // A finite number in [lo, hi].
  double number(double lo, double hi) { return parse_number(cur_, value(), lo, hi); }
  // Comma-separated items, none empty.
  std::vector<std::string> list() { return parse_list(cur_, value()); }

  static long long parse_integer(std::string_view what, std::string_view text, long long lo, long long hi) {
    long long x = 0;
    const auto r = std::from_chars(text.data(), text.data() + text.size(), x);
    if (text.empty() || r.ec == std::errc::invalid_argument || r.ptr != text.data() + text.size())
      throw UsageError(std::string(what) + ": '" + std::string(text) + "' is not an integer (expected " +
                       std::to_string(lo) + ".." + std::to_string(hi) + ")");
    if (r.ec == std::errc::result_out_of_range || x < lo || x > hi)
      throw UsageError(std::string(what) + ": " + std::string(text) + " is out of range " + std::to_string(lo) + ".." +
                       std::to_string(hi));
    return x;
  }
  static double parse_number(std::string_view what, std::string_view text, double lo, double hi) {
    double x = 0;
    const auto r = std::from_chars(text.data(), text.data() + text.size(), x);
    if (text.empty() || r.ec == std::errc::invalid_argument || r.ptr != text.data() + text.size() || !std::isfinite(x))
      throw UsageError(std::string(what) + ": '" + std::string(text) + "' is not a number");
    if (r.ec == std::errc::result_out_of_range || x < lo || x > hi)
      throw UsageError(std::string(what) + ": " + std::string(text) + " is out of range [" + trim(lo) + ", " +
                       trim(hi) + "]");
    return x;
  }
  static std::vector<std::string> parse_list(std::string_view what, std::string_view text) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (true) {
      const std::size_t comma = std::min(text.find(',', start), text.size());
      if (comma == start)
        throw UsageError(std::string(what) + ": '" + std::string(text) + "' has an empty item (expected a,b,...)");
      out.emplace_back(text.substr(start, comma - start));
      if (comma == text.size()) break;
      start = comma + 1;
    }
    return out;
  }

  // "--a, --b, ..." for error messages.
  std::string option_list() const {
    std::string s;
    for (const Option& o : options_) s += (s.empty() ? "" : ", ") + std::string(o.name);
    return s + ", --help";
  }

  // The usage text: a synopsis line, then one line per option.
  std::string help(std::string_view synopsis) const {
    std::string s = std::string(synopsis) + "\n";
    for (const Option& o : options_) {
      std::string left = "  " + std::string(o.name) + (o.arg.empty() ? "" : " " + std::string(o.arg));
      if (left.size() < 24) left.resize(24, ' ');
      else left += "\n" + std::string(24, ' ');
      std::string help(o.help);  // continuation lines of the help text line up under its first line
      for (std::size_t i = 0; (i = help.find('\n', i)) != std::string::npos; i += 25) help.insert(i + 1, 24, ' ');
      s += left + help + "\n";
    }
    return s + "  --help, -h            this text\n";
  }

 private:
  const Option* find(std::string_view name) const {
    for (const Option& o : options_)
      if (o.name == name) return &o;
    return nullptr;
  }
  static std::string trim(double x) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", x);
    return b;
  }

  std::string_view program_;
  std::vector<Option> options_;
  bool positional_ = false;
  std::vector<std::string> args_;
  std::size_t i_ = 0;
  std::string cur_, value_;
  bool has_inline_ = false, pending_ = false, is_positional_ = false;
};

// An input file that must exist and be a regular file: MissingInput otherwise, naming it and what it is for.
inline void require_file(const std::string& path, std::string_view what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw UsageError(std::string(what) + " " + path + " is a directory, not a file");
  if (!fs::exists(path, ec)) throw MissingInput(std::string(what) + " " + path + " not found");
}

// A folder given on the command line: must exist and be a directory.
inline void require_dir(const std::string& path, std::string_view what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw MissingInput(std::string(what) + " " + path + " not found");
  if (!fs::is_directory(path, ec)) throw UsageError(std::string(what) + " " + path + " is not a directory");
}

// An absolute, normalised form of a path given relative to the caller's directory (for messages).
inline std::string absolute(const std::string& path) {
  std::error_code ec;
  const auto p = std::filesystem::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

}  // namespace cli
