// longheads_run, driven as a user would: .npy files in, .npy files out, compared with the
// library called directly; bad flags and files give one line on stderr and a non-zero exit.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "../examples/common/npy.hpp"
#include "test_support.hpp"
#include "tool_run.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;

namespace {
fs::path work_dir() { return test::work_dir("longheads_run_test"); }

test::tool_run run_tool(const std::string& args) { return test::run_tool(work_dir(), LONGHEADS_RUN_PATH, args); }

struct fixture {
  test::sequence seq{150, 4, 2, 16, 2024};
  std::string files;
  fixture() {
    npy::save((work_dir() / "q.npy").string(), {150, 4, 16}, seq.q.data());
    npy::save((work_dir() / "k.npy").string(), {150, 2, 16}, seq.k.data());
    npy::save((work_dir() / "v.npy").string(), {150, 2, 16}, seq.v.data());
    files = "--q " + (work_dir() / "q.npy").string() + " --k " + (work_dir() / "k.npy").string() + " --v " +
            (work_dir() / "v.npy").string();
  }
  std::string out(const std::string& name) const { return (work_dir() / name).string(); }
};
}  // namespace

TEST_CASE("longheads_run's output equals the library called directly, for every split") {
  fixture f;
  longheads::attention_config c = test::make_config(4, 2, 16, 8, 4);
  longheads::attention<> direct(c, longheads::rope(16, 500000.0, longheads::rope_layout::interleaved));
  std::vector<std::int32_t> expected_selections;
  const auto expected = f.seq.run(direct, 0, &expected_selections);
  const std::string knobs = " --chunk-size 8 --chunks 4 --rope-theta 500000 --rope-layout interleaved";
  for (const std::string split : {"", " --split 1", " --split 7"}) {
    CAPTURE(split);
    const auto r = run_tool(f.files + knobs + split + " --out " + f.out("out.npy") + " --selections " + f.out("sel.npy"));
    REQUIRE(r.exit_code == 0);
    const auto out = npy::load<float>(f.out("out.npy"));
    CHECK(out.shape == std::vector<std::int64_t>{150, 4, 16});
    CHECK(test::max_abs_diff(out.data, expected) <= 1e-5);
    const auto sel = npy::load<std::int32_t>(f.out("sel.npy"));
    CHECK(sel.shape == std::vector<std::int64_t>{150, 4, 4});
    CHECK(sel.data == expected_selections);
  }
  const auto threaded = run_tool(f.files + knobs + " --threads 2 --out " + f.out("out2.npy"));
  REQUIRE(threaded.exit_code == 0);
  CHECK(test::max_abs_diff(npy::load<float>(f.out("out2.npy")).data, expected) == 0.0);
}

TEST_CASE("longheads_run's baselines equal the library's") {
  fixture f;
  for (auto [name, method] : {std::pair{"dense", longheads::attention_method::dense},
                              std::pair{"sink-window", longheads::attention_method::sink_window}}) {
    longheads::attention_config c = test::make_config(4, 2, 16, 8, 4, method);
    c.sink_tokens = 3;
    longheads::attention<> direct(c, longheads::rope(16));
    const auto r = run_tool(f.files + " --chunk-size 8 --chunks 4 --sink-tokens 3 --attention " + name + " --out " + f.out("b.npy"));
    REQUIRE(r.exit_code == 0);
    CHECK(test::max_abs_diff(npy::load<float>(f.out("b.npy")).data, f.seq.run(direct)) <= 1e-6);
  }
}

TEST_CASE("longheads_run rejects bad flags and files with one line naming the problem") {
  fixture f;
  std::ofstream(work_dir() / "junk.npy") << "not numpy at all";
  std::vector<float> wrong(150 * 2 * 8);
  npy::save((work_dir() / "k8.npy").string(), {150, 2, 8}, wrong.data());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {f.files + " --chunks 0", "budget_chunks must be > 0"},
      {f.files + " --chunks 2", "budget_chunks (2) must be >= sink_chunks + local_chunks"},
      {f.files + " --rope-layout diagonal", "--rope-layout"},
      {f.files + " --attention sparse", "--attention"},
      {f.files + " --bogus-flag", "bogus"},
      {"--q " + (work_dir() / "junk.npy").string() + " --k x --v y", "File does not exist"},
      {"--q " + (work_dir() / "junk.npy").string() + " --k " + (work_dir() / "k.npy").string() + " --v " +
           (work_dir() / "v.npy").string(),
       "not a .npy file"},
      {"--q " + (work_dir() / "q.npy").string() + " --k " + (work_dir() / "k8.npy").string() + " --v " +
           (work_dir() / "k8.npy").string(),
       "T and head_dim must agree"},
  };
  for (const auto& [args, words] : cases) {
    CAPTURE(args);
    const auto r = run_tool(args);
    CHECK(r.exit_code != 0);
    CHECK(r.stderr_text.find(words) != std::string::npos);
    CHECK(std::count(r.stderr_text.begin(), r.stderr_text.end(), '\n') == 1);
  }
}
