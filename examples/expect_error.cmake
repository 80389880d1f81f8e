# Runs one example program with bad arguments and checks how it fails (cmake -P, from cli_tests.cmake):
#   -DPROGRAM=path -DARGS="a|b|c" -DEXIT=2 -DMATCH=regex [-DNEEDS_MODEL=1] [-DPREPARE=file -DCONTENT=text]
# Passes when the exit code is EXIT and stderr is exactly one line matching MATCH. With NEEDS_MODEL, exit
# code 3 (input files missing) with another message prints SKIPPED instead (the test's SKIP_REGULAR_EXPRESSION):
# the model is absent, and the case cannot reach what it tests.
if(PREPARE)
  file(WRITE "${PREPARE}" "${CONTENT}")
endif()
string(REPLACE "|" ";" ARGS "${ARGS}")
execute_process(COMMAND ${PROGRAM} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NEEDS_MODEL AND rc EQUAL 3 AND NOT err MATCHES "${MATCH}")
  message("SKIPPED: model files absent (${err})")
  return()
endif()
string(REGEX REPLACE "\n$" "" line "${err}")
if(NOT rc EQUAL EXIT)
  message(FATAL_ERROR "exit code ${rc}, expected ${EXIT}\nstderr: ${err}\nstdout: ${out}")
endif()
if(line MATCHES "\n" OR line STREQUAL "")
  message(FATAL_ERROR "stderr is not exactly one line:\n${err}")
endif()
if(NOT line MATCHES "${MATCH}")
  message(FATAL_ERROR "stderr does not match '${MATCH}':\n${err}")
endif()
message("ok: ${line}")
