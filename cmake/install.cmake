# Install rules and the fastattn CMake package, so that after `cmake --install` another project can
#   find_package(fastattn REQUIRED)
#   target_link_libraries(app PRIVATE fastattn::fastattn)
# Installs the public headers (include/fastattn), the static library and
# lib/cmake/fastattn/{fastattnConfig,fastattnConfigVersion,fastattnTargets}.cmake.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# A Python wheel (scikit-build-core sets SKBUILD) ships the extension only, not the C++ package.
if(SKBUILD)
  set(_fastattn_install_default OFF)
else()
  set(_fastattn_install_default ON)
endif()
option(FASTATTN_INSTALL "Install the C++ headers, library and CMake package" ${_fastattn_install_default})

if(FASTATTN_INSTALL)
  set(FASTATTN_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/fastattn" CACHE STRING
      "Where fastattnConfig.cmake is installed, relative to the prefix")

  install(TARGETS fastattn EXPORT fastattnTargets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT fastattn_dev
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT fastattn_dev
          INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/include/fastattn
          DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT fastattn_dev
          FILES_MATCHING PATTERN "*.h")
  install(EXPORT fastattnTargets NAMESPACE fastattn:: FILE fastattnTargets.cmake
          DESTINATION ${FASTATTN_INSTALL_CMAKEDIR} COMPONENT fastattn_dev)

  configure_package_config_file(
    ${CMAKE_CURRENT_SOURCE_DIR}/cmake/fastattnConfig.cmake.in
    ${CMAKE_CURRENT_BINARY_DIR}/fastattnConfig.cmake
    INSTALL_DESTINATION ${FASTATTN_INSTALL_CMAKEDIR})
  # 0.x: a minor version may change the API, so only the same MAJOR.MINOR is compatible.
  write_basic_package_version_file(
    ${CMAKE_CURRENT_BINARY_DIR}/fastattnConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
  install(FILES ${CMAKE_CURRENT_BINARY_DIR}/fastattnConfig.cmake
                ${CMAKE_CURRENT_BINARY_DIR}/fastattnConfigVersion.cmake
          DESTINATION ${FASTATTN_INSTALL_CMAKEDIR} COMPONENT fastattn_dev)
endif()
