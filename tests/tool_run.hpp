// Runs an example executable as a user would, capturing its exit code and stderr.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace test {

struct tool_run {
  int exit_code;
  std::string stderr_text;
};

/// A scratch directory for this test process.
inline std::filesystem::path work_dir(const std::string& name) {
  static const std::filesystem::path dir = [&] {
    auto d = std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline tool_run run_tool(const std::filesystem::path& dir, const std::string& executable, const std::string& args,
                         const std::string& stdout_file = "/dev/null") {
  const auto err = dir / "stderr.txt";
  const std::string command = executable + " " + args + " > " + stdout_file + " 2> " + err.string();
  const int status = std::system(command.c_str());
  std::ifstream in(err);
  std::stringstream text;
  text << in.rdbuf();
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text.str()};
}

}  // namespace test
