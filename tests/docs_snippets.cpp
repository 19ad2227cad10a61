// Keeps the docs honest: every C++, CMake and Python block in README.md and docs/*.md must be a
// verbatim copy of a region of a file that CI compiles or runs, and the configuration reference
// must list every attention_config field with its default.
//
//   docs_snippets <source dir>          check; prints each stale or unchecked block, exit 1
//   docs_snippets <source dir> --fix    rewrite the docs' blocks from the sources
//
// A block is tied to its source by the line just before it:
//   <!-- snippet: examples/docs/embed/tiny_engine.cpp#forward -->
// which names the lines between "[snippet:forward]" and "[/snippet:forward]" in that file
// (any comment style); without "#name" it names the whole file.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string join(const std::vector<std::string>& lines, std::size_t begin, std::size_t end) {
  std::string s;
  for (std::size_t i = begin; i < end; ++i) s += lines[i] + "\n";
  return s;
}

/// Lines [begin, end) without the indentation they all share (a region inside a function
/// reads as top-level code in the docs).
std::string dedent(const std::vector<std::string>& lines, std::size_t begin, std::size_t end) {
  std::size_t indent = std::string::npos;
  for (std::size_t i = begin; i < end; ++i)
    if (const auto first = lines[i].find_first_not_of(' '); first != std::string::npos) indent = std::min(indent, first);
  std::string s;
  for (std::size_t i = begin; i < end; ++i) s += (lines[i].size() > indent ? lines[i].substr(indent) : std::string()) + "\n";
  return s;
}

/// The named region of a source file, or the whole file.
std::string region(const fs::path& file, const std::string& name) {
  const auto lines = read_lines(file);
  if (name.empty()) return join(lines, 0, lines.size());
  const std::string open = "[snippet:" + name + "]", close = "[/snippet:" + name + "]";
  std::size_t begin = lines.size();
  for (std::size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].find(open) != std::string::npos) begin = i + 1;
    if (lines[i].find(close) != std::string::npos && begin <= i) return dedent(lines, begin, i);
  }
  throw std::runtime_error(file.string() + " has no region " + name);
}

/// Checks (or with fix, rewrites) one Markdown file; returns the number of problems.
int check_markdown(const fs::path& root, const fs::path& md, bool fix) {
  static const std::regex marker(R"(^<!-- snippet: ([^#\s]+)(#(\S+))? -->$)");
  static const std::regex checked_fence(R"(^```(cpp|c\+\+|cmake|python)\s*$)");
  auto lines = read_lines(md);
  std::vector<std::string> output;
  int problems = 0;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    std::smatch m;
    if (std::regex_match(lines[i], m, marker) && i + 1 < lines.size() && lines[i + 1].rfind("```", 0) == 0) {
      std::size_t end = i + 2;
      while (end < lines.size() && lines[end] != "```") ++end;
      const std::string actual = join(lines, i + 2, end);
      const std::string expected = region(root / m[1].str(), m[3].str());
      output.push_back(lines[i]);
      output.push_back(lines[i + 1]);
      if (actual != expected) {
        if (!fix) {
          std::cerr << md.string() << ":" << i + 1 << ": block differs from " << m[1].str()
                    << (m[3].matched ? "#" + m[3].str() : "") << " (run docs_snippets <source dir> --fix)\n";
          ++problems;
        }
        std::istringstream fresh(expected);
        for (std::string line; std::getline(fresh, line);) output.push_back(line);
      } else {
        for (std::size_t j = i + 2; j < end; ++j) output.push_back(lines[j]);
      }
      if (end < lines.size()) output.push_back(lines[end]);
      i = end;
      continue;
    }
    if (std::regex_match(lines[i], checked_fence)) {
      std::cerr << md.string() << ":" << i + 1 << ": code block without a <!-- snippet: file#region --> source line\n";
      ++problems;
    }
    output.push_back(lines[i]);
  }
  if (fix && output != lines) {
    std::ofstream out(md);
    for (const auto& line : output) out << line << "\n";
    std::cout << "updated " << md.string() << "\n";
  }
  return problems;
}

/// Every field of attention_config is a row "| `name` | default | ..." of configuration.md.
int check_configuration(const fs::path& root) {
  const auto header = read_lines(root / "include/longheads/attention_config.hpp");
  const auto doc = join(read_lines(root / "docs/configuration.md"), 0, read_lines(root / "docs/configuration.md").size());
  static const std::regex field(R"(^  [A-Za-z_:0-9]+ ([a-z_]+) = ([^;]+);)");
  int problems = 0, fields = 0;
  bool inside = false;
  for (const auto& line : header) {
    if (line.rfind("struct attention_config", 0) == 0) inside = true;
    if (inside && line == "};") break;
    std::smatch m;
    if (!inside || !std::regex_search(line, m, field)) continue;
    ++fields;
    std::string value = m[2].str();
    if (const auto colon = value.rfind("::"); colon != std::string::npos) value = value.substr(colon + 2);
    const std::string row = "| `" + m[1].str() + "` | `" + value + "` |";
    if (doc.find(row) == std::string::npos) {
      std::cerr << "docs/configuration.md: no row starting with " << row << " (attention_config." << m[1].str() << ")\n";
      ++problems;
    }
  }
  if (fields < 10) {
    std::cerr << "attention_config.hpp: found only " << fields << " fields; the parser is out of date\n";
    ++problems;
  }
  return problems;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: docs_snippets <source dir> [--fix]\n";
    return 2;
  }
  const fs::path root = argv[1];
  const bool fix = argc > 2 && std::string(argv[2]) == "--fix";
  try {
    std::vector<fs::path> docs = {root / "README.md"};
    for (const auto& entry : fs::directory_iterator(root / "docs"))
      if (entry.path().extension() == ".md") docs.push_back(entry.path());
    int problems = check_configuration(root);
    for (const auto& md : docs) problems += check_markdown(root, md, fix);
    if (problems == 0) std::cout << "docs_snippets: " << docs.size() << " Markdown files in sync with their sources\n";
    return problems == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "docs_snippets: " << e.what() << "\n";
    return 1;
  }
}
