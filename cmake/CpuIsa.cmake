# SPDX-License-Identifier: Apache-2.0
# fastlayers_add_cpu_isa(<target> <isa> <flags>)
# Compiles FASTLAYERS_CPU_ISA_SOURCES once more with <flags> and FL_CPU_ISA=<isa>, and links the
# objects into <target>. The kernels land in namespace fastlayers::cpu::<isa>; csrc/common/cpu_isa.cpp
# picks one at run time, so wheels never need -march=native.
function(fastlayers_add_cpu_isa target isa flags)
  set(lib fastlayers_cpu_${isa})
  add_library(${lib} OBJECT ${FASTLAYERS_CPU_ISA_SOURCES})
  target_include_directories(${lib} PRIVATE ${PROJECT_SOURCE_DIR}/csrc)
  target_compile_definitions(${lib} PRIVATE FL_CPU_ISA=${isa})
  target_compile_options(${lib} PRIVATE -O3 -Wall -Wextra ${flags})
  target_link_libraries(${lib} PRIVATE OpenMP::OpenMP_CXX)
  target_sources(${target} PRIVATE $<TARGET_OBJECTS:${lib}>)
endfunction()
