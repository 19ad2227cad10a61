// SPDX-License-Identifier: MIT
// Pictures through gnuplot (Debian's gnuplot-nox): the data go to a temporary file, the script
// to gnuplot's stdin; a missing gnuplot is an error that says which package to install.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

inline void run_gnuplot(const std::string& script, const std::filesystem::path& out) {
  FILE* pipe = popen("gnuplot 2>&1", "w");
  if (pipe == nullptr) throw std::runtime_error("cannot start gnuplot (apt-get install gnuplot-nox)");
  std::fputs(script.c_str(), pipe);
  const int status = pclose(pipe);
  if (status != 0) throw std::runtime_error("gnuplot failed drawing " + out.string() + " (is gnuplot-nox installed?)");
}

inline std::string quoted(const std::filesystem::path& p) {
  std::string s = "'";
  for (char c : p.string()) s += c == '\'' ? std::string("''") : std::string(1, c);
  return s + "'";
}

struct accuracy_series {
  std::string method;
  std::vector<std::int64_t> lengths;
  std::vector<double> accuracy;  // percent
};

/// Accuracy (%) against context length, one line per method, log2 x axis.
inline void plot_accuracy(const std::vector<accuracy_series>& series, std::int64_t trained_context, const std::string& title,
                          const std::filesystem::path& out) {
  const auto data = std::filesystem::path(out).replace_extension(".dat");
  {
    std::ofstream f(data);
    for (const auto& s : series) {
      f << "# " << s.method << "\n";
      for (std::size_t i = 0; i < s.lengths.size(); ++i) f << s.lengths[i] << ' ' << s.accuracy[i] << '\n';
      f << "\n\n";
    }
  }
  std::string script = "set terminal pngcairo size 900,540 noenhanced\nset output " + quoted(out) + "\n";
  script += "set title '" + title + "'\nset logscale x 2\nset xlabel 'context length (tokens)'\nset ylabel 'passkey accuracy (%)'\n";
  script += "set yrange [-5:105]\nset key outside right\nset grid\n";
  script += "set arrow from " + std::to_string(trained_context) + ", graph 0 to " + std::to_string(trained_context) +
            ", graph 1 nohead dashtype 2\nset label 'trained context' at " + std::to_string(trained_context) + ", graph 0.95 offset 1,0\n";
  script += "plot ";
  for (std::size_t i = 0; i < series.size(); ++i)
    script += (i ? ", " : "") + quoted(data) + " index " + std::to_string(i) + " with linespoints lw 2 pt 7 title '" + series[i].method + "'";
  script += "\n";
  run_gnuplot(script, out);
  std::filesystem::remove(data);
}

/// rows x cols 0/1 matrix as an image: rows are (layer, head), columns chunk ids; the needle's
/// chunks are marked by red arrows above and below.
inline void plot_selection_heatmap(const std::vector<std::vector<int>>& selected, const std::vector<std::string>& row_labels,
                                   const std::vector<std::int64_t>& needle_chunks, const std::string& title,
                                   const std::filesystem::path& out) {
  const auto data = std::filesystem::path(out).replace_extension(".dat");
  {
    std::ofstream f(data);
    for (const auto& row : selected) {
      for (std::size_t c = 0; c < row.size(); ++c) f << (c ? " " : "") << row[c];
      f << '\n';
    }
  }
  const std::size_t cols = selected.empty() ? 0 : selected.front().size();
  std::string script = "set terminal pngcairo size 1200," + std::to_string(160 + 22 * selected.size()) + " noenhanced\n";
  script += "set output " + quoted(out) + "\nset title '" + title + "'\n";
  script += "set xlabel 'chunk id'\nset ylabel 'layer / head'\nunset colorbox\nset palette defined (0 'white', 1 'navy')\n";
  script += "set xrange [-0.5:" + std::to_string(cols) + ".5]\nset yrange [" + std::to_string(selected.size()) + ".5:-0.5]\n";
  script += "set ytics (";
  for (std::size_t r = 0; r < row_labels.size(); ++r) script += (r ? ", '" : "'") + row_labels[r] + "' " + std::to_string(r);
  script += ")\n";
  for (std::int64_t c : needle_chunks)
    // Marks above and below the plot, so the cells of the needle's column stay visible.
    script += "set arrow from " + std::to_string(c) + ", graph 1.06 to " + std::to_string(c) + ", graph 1.0 head filled size screen 0.008,30 lc rgb 'red' lw 2 front\n" +
              "set arrow from " + std::to_string(c) + ", graph -0.06 to " + std::to_string(c) + ", graph 0.0 head filled size screen 0.008,30 lc rgb 'red' lw 2 front\n";
  script += "plot " + quoted(data) + " matrix with image notitle\n";
  run_gnuplot(script, out);
  std::filesystem::remove(data);
}

}  // namespace llama2c
