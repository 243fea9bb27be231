# SPDX-License-Identifier: Apache-2.0
# Finds the CUTLASS headers. Search order: -DCUTLASS_DIR / $ENV{CUTLASS_DIR}, the nvidia-cutlass wheel
# (installed with --no-deps; located with importlib.util.find_spec, without importing it), then
# third_party/cutlass (filled by third_party/fetch_cutlass.py). Defines CUTLASS::cutlass.
set(_cutlass_hints "")
foreach(_dir IN ITEMS "${CUTLASS_DIR}" "$ENV{CUTLASS_DIR}")
  if(_dir)
    list(APPEND _cutlass_hints "${_dir}/include")
  endif()
endforeach()
if(Python_EXECUTABLE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')"
    OUTPUT_VARIABLE _cutlass_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_cutlass_wheel)
    list(APPEND _cutlass_hints "${_cutlass_wheel}/include")
  endif()
endif()
list(APPEND _cutlass_hints "${PROJECT_SOURCE_DIR}/third_party/cutlass/include")

find_path(CUTLASS_INCLUDE_DIR NAMES cutlass/cutlass.h cute/tensor.hpp HINTS ${_cutlass_hints} NO_DEFAULT_PATH)
if(CUTLASS_INCLUDE_DIR AND EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h")
  file(STRINGS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h" _v REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*" "\\1" _maj "${_v}")
  string(REGEX REPLACE ".*CUTLASS_MINOR ([0-9]+).*" "\\1" _min "${_v}")
  string(REGEX REPLACE ".*CUTLASS_PATCH ([0-9]+).*" "\\1" _pat "${_v}")
  set(CUTLASS_VERSION "${_maj}.${_min}.${_pat}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CUTLASS REQUIRED_VARS CUTLASS_INCLUDE_DIR VERSION_VAR CUTLASS_VERSION)

if(CUTLASS_FOUND AND NOT TARGET CUTLASS::cutlass)
  add_library(CUTLASS::cutlass INTERFACE IMPORTED)
  get_filename_component(_cutlass_root "${CUTLASS_INCLUDE_DIR}" DIRECTORY)
  set(_incs "${CUTLASS_INCLUDE_DIR}")
  if(EXISTS "${_cutlass_root}/tools/util/include")
    list(APPEND _incs "${_cutlass_root}/tools/util/include")
  endif()
  set_target_properties(CUTLASS::cutlass PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_incs}"
                                                    INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${_incs}")
endif()
