# Builds and runs tests/consumer against kvtrim (invoked by CTest with cmake -P):
#   MODE=install       from the install tree of the build being tested (KVTRIM_BUILD); the consumer may not
#                      find the CUDA toolkit, so this also checks that a CPU-only project does not need it
#   MODE=subdirectory  through add_subdirectory, which must leave CUDA off unless the parent asks
#   MODE=cuda_install  from a fresh install of the source configured with -DKVTRIM_CUDA=ON (configure and
#                      install only: nothing of kvtrim's is compiled); a CPU-only consumer without the CUDA
#                      toolkit builds against it, and find_package(kvtrim COMPONENTS cuda) finds kvtrim::cuda
#                      when the toolkit is there (configure only). Needs NVCC (the CUDA compiler).
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
set(consumer ${KVTRIM_SOURCE}/tests/consumer)
set(no_cuda -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)  # find_package(CUDAToolkit) fails in the consumer
if(MODE STREQUAL "install")
  run(${CMAKE_COMMAND} --install ${KVTRIM_BUILD} --prefix ${WORK}/prefix)
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK}/build -G ${CMAKE_GENERATOR} -DCMAKE_PREFIX_PATH=${WORK}/prefix
      ${no_cuda})
elseif(MODE STREQUAL "subdirectory")
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK}/build -G ${CMAKE_GENERATOR} -DKVTRIM_SUBDIR=${KVTRIM_SOURCE})
elseif(MODE STREQUAL "cuda_install")
  run(${CMAKE_COMMAND} -S ${KVTRIM_SOURCE} -B ${WORK}/kvtrim -G ${CMAKE_GENERATOR} -DCMAKE_BUILD_TYPE=Release
      -DKVTRIM_CUDA=ON -DCMAKE_CUDA_COMPILER=${NVCC} -DKVTRIM_BUILD_TESTS=OFF -DKVTRIM_BUILD_BENCHMARKS=OFF
      -DKVTRIM_BUILD_EXAMPLES=OFF -DKVTRIM_INSTALL=ON)
  run(${CMAKE_COMMAND} --install ${WORK}/kvtrim --prefix ${WORK}/prefix)
  file(GLOB_RECURSE cuda_targets ${WORK}/prefix/*/kvtrimCudaTargets.cmake)
  if(NOT cuda_targets)
    message(FATAL_ERROR "the install made with KVTRIM_CUDA=ON has no kvtrimCudaTargets.cmake")
  endif()
  get_filename_component(cuda_root ${NVCC} DIRECTORY)
  get_filename_component(cuda_root ${cuda_root} DIRECTORY)
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK}/probe -G ${CMAKE_GENERATOR} -DCMAKE_PREFIX_PATH=${WORK}/prefix
      -DCUDAToolkit_ROOT=${cuda_root} -DEXPECT_CUDA_COMPONENT=ON)
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK}/build -G ${CMAKE_GENERATOR} -DCMAKE_PREFIX_PATH=${WORK}/prefix
      ${no_cuda} -DEXPECT_CUDA_COMPONENT=OFF)
else()
  message(FATAL_ERROR "MODE must be install, subdirectory or cuda_install")
endif()
run(${CMAKE_COMMAND} --build ${WORK}/build)
run(${WORK}/build/consumer)
