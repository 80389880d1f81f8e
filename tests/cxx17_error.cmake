# Compiles `#include <kvtrim/kvtrim.hpp>` as C++17 (preprocessing stops at the first fatal error, so this
# takes a moment): it must fail with kvtrim's message, and with nothing but that and the fatal stop.
file(MAKE_DIRECTORY ${WORK})
file(WRITE ${WORK}/old.cpp "#include <kvtrim/kvtrim.hpp>\nint main() {}\n")
execute_process(COMMAND ${CXX} -std=c++17 -fsyntax-only -I${INCLUDE} ${WORK}/old.cpp
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(REGEX MATCHALL "error:" errors "${err}")
list(LENGTH errors n)
if(rc EQUAL 0 OR NOT err MATCHES "kvtrim needs C\\+\\+20" OR n GREATER 2)
  message(FATAL_ERROR "expected one 'kvtrim needs C++20' error (rc ${rc}, ${n} diagnostics):\n${err}")
endif()
message(STATUS "C++17 gets: ${err}")
