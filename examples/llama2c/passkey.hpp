// SPDX-License-Identifier: MIT
// The passkey-retrieval task of ../shared/models/make_passkey_prompts.py, in C++: the same
// vocabulary (read from the model's vocab file), sentences and layout, with a C++ RNG of its
// own; plus a reader for the generator's fixed prompt sets (manifest.jsonl + int32 files).
//
//   <s> TASK FILLER... NEEDLE FILLER... QUESTION   -> the five passkey digits
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"

namespace llama2c {

/// id <-> word, from a `id<TAB>word` file.
class vocabulary {
 public:
  explicit vocabulary(const std::filesystem::path& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error(path.string() + ": cannot open vocabulary file");
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      const auto tab = line.find('\t');
      if (tab == std::string::npos) throw std::runtime_error(path.string() + ":" + std::to_string(n) + ": expected id<TAB>word");
      int id = -1;
      try {
        id = std::stoi(line.substr(0, tab));
      } catch (const std::exception&) {
        throw std::runtime_error(path.string() + ":" + std::to_string(n) + ": id is not a number");
      }
      if (id != static_cast<int>(words_.size()))
        throw std::runtime_error(path.string() + ":" + std::to_string(n) + ": ids must count up from 0, got " + std::to_string(id));
      words_.push_back(line.substr(tab + 1));
      ids_.emplace(words_.back(), id);
    }
    if (words_.empty()) throw std::runtime_error(path.string() + ": empty vocabulary");
  }

  int size() const noexcept { return static_cast<int>(words_.size()); }
  const std::string& word(std::int32_t id) const { return words_.at(static_cast<std::size_t>(id)); }
  std::int32_t id(const std::string& word) const {
    const auto it = ids_.find(word);
    if (it == ids_.end()) throw std::runtime_error("vocabulary has no word '" + word + "'");
    return it->second;
  }
  std::vector<std::int32_t> encode(const std::string& text) const {
    std::istringstream in(text);
    std::vector<std::int32_t> out;
    for (std::string w; in >> w;) out.push_back(id(w));
    return out;
  }
  std::string decode(std::span<const std::int32_t> ids) const {
    std::string out;
    for (std::int32_t i : ids) {
      if (!out.empty()) out += ' ';
      if (i >= 0 && i < size()) {
        out += word(i);
      } else {  // (not "<" + to_string(i): GCC 12 -Wrestrict false positive)
        out += '<';
        out += std::to_string(i);
        out += '>';
      }
    }
    return out;
  }

 private:
  std::vector<std::string> words_;
  std::map<std::string, std::int32_t> ids_;
};

struct passkey_prompt {
  std::string name;                   // file name or a generated label
  std::vector<std::int32_t> tokens;   // the prompt, length - 5 tokens
  std::vector<std::int32_t> answer;   // the five digit tokens
  std::int64_t length = 0;            // prompt + answer
  std::int64_t needle_start = 0;      // [start, end) of the needle sentence in the prompt
  std::int64_t needle_end = 0;
  /// A retrieval set's other needles ([start, end) each): the alias needle (two-hop), if any,
  /// and the distractors, whose selection the host reports beside the target's.
  std::optional<std::pair<std::int64_t, std::int64_t>> alias_span;
  std::vector<std::pair<std::int64_t, std::int64_t>> distractor_spans;
  std::string task;  ///< a retrieval set's task ("mk", "hop"); empty for passkey
  double depth = 0;
};

enum class filler_mode { mixed, paper, random };

class passkey_task {
 public:
  static constexpr int answer_tokens = 5;
  static constexpr std::int32_t bos = 1;

  explicit passkey_task(const vocabulary& vocab) : vocab_(vocab) {
    task_ = vocab.encode(
        "there is an important info hidden inside a lot of irrelevant text . find it and memorize them . "
        "i will quiz you about the important information there .");
    question_ = vocab.encode("what is the pass key ? the pass key is");
    for (const char* s : {"the grass is green .", "the sky is blue .", "the sun is yellow .", "here we go .", "there and back again ."})
      fixed_.push_back(vocab.encode(s));
    for (int d = 0; d < 10; ++d) digits_.push_back(vocab.id(std::to_string(d)));
    period_ = vocab.id(".");
    const std::vector<std::string> not_words = {"<unk>", "<s>", "</s>", ".", "?", ","};
    for (std::int32_t i = 0; i < vocab.size(); ++i) {
      const std::string& w = vocab.word(i);
      const bool digit = w.size() == 1 && w[0] >= '0' && w[0] <= '9';
      if (!digit && std::find(not_words.begin(), not_words.end(), w) == not_words.end()) word_pool_.push_back(i);
    }
    needle_tokens_ = static_cast<std::int64_t>(needle(0).size());
  }

  /// Tokens besides the filler.
  std::int64_t overhead() const noexcept {
    return 1 + static_cast<std::int64_t>(task_.size() + question_.size()) + needle_tokens_;
  }

  /// A prompt whose prompt + answer is `length` tokens, the needle after round(depth * filler).
  passkey_prompt make(std::int64_t length, double depth, std::uint64_t seed, filler_mode filler = filler_mode::mixed) const {
    const std::int64_t n_fill = length - answer_tokens - overhead();
    if (n_fill < 0) throw std::invalid_argument("passkey length must be >= " + std::to_string(overhead() + answer_tokens));
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x70617373ull);  // "pass"
    const int passkey = std::uniform_int_distribution<int>(10000, 99999)(rng);
    const std::vector<std::int32_t> fill = filler_stream(rng, n_fill, filler);
    const auto n_pre = static_cast<std::int64_t>(std::llround(std::clamp(depth, 0.0, 1.0) * static_cast<double>(n_fill)));
    passkey_prompt p;
    p.name = "L" + std::to_string(length) + "_d" + std::to_string(depth).substr(0, 4) + "_s" + std::to_string(seed);
    p.length = length;
    p.depth = depth;
    p.tokens.push_back(bos);
    p.tokens.insert(p.tokens.end(), task_.begin(), task_.end());
    p.tokens.insert(p.tokens.end(), fill.begin(), fill.begin() + n_pre);
    p.needle_start = static_cast<std::int64_t>(p.tokens.size());
    const auto n = needle(passkey);
    p.tokens.insert(p.tokens.end(), n.begin(), n.end());
    p.needle_end = static_cast<std::int64_t>(p.tokens.size());
    p.tokens.insert(p.tokens.end(), fill.begin() + n_pre, fill.end());
    p.tokens.insert(p.tokens.end(), question_.begin(), question_.end());
    p.answer = digits_of(passkey);
    return p;
  }

 private:
  std::vector<std::int32_t> digits_of(int passkey) const {
    std::vector<std::int32_t> out;
    for (char c : std::to_string(passkey)) out.push_back(digits_[static_cast<std::size_t>(c - '0')]);
    return out;
  }

  // "the pass key is D D D D D . remember it . D D D D D is the pass key ."
  std::vector<std::int32_t> needle(int passkey) const {
    std::string digits;
    for (char c : std::to_string(passkey)) digits += std::string(" ") + c;
    if (passkey == 0) digits = " 0 0 0 0 0";
    return vocab_.encode("the pass key is" + digits + " . remember it ." + digits + " is the pass key .");
  }

  std::vector<std::int32_t> filler_stream(std::mt19937_64& rng, std::int64_t n, filler_mode mode) const {
    std::vector<std::int32_t> out;
    out.reserve(static_cast<std::size_t>(n) + 64);
    if (mode == filler_mode::paper) {
      while (static_cast<std::int64_t>(out.size()) < n)
        for (const auto& s : fixed_) out.insert(out.end(), s.begin(), s.end());
      out.resize(static_cast<std::size_t>(n));
      return out;
    }
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    const double p_fixed = mode == filler_mode::mixed ? unit(rng) : 0.0;
    while (static_cast<std::int64_t>(out.size()) < n) {
      if (unit(rng) < p_fixed) {
        const auto start = std::uniform_int_distribution<std::size_t>(0, fixed_.size() - 1)(rng);
        const int run = std::uniform_int_distribution<int>(1, 10)(rng);
        for (int j = 0; j < run; ++j) {
          const auto& s = fixed_[(start + static_cast<std::size_t>(j)) % fixed_.size()];
          out.insert(out.end(), s.begin(), s.end());
        }
      } else {
        const int words = std::uniform_int_distribution<int>(3, 12)(rng);
        std::uniform_int_distribution<std::size_t> pick(0, word_pool_.size() - 1);
        for (int j = 0; j < words; ++j) out.push_back(word_pool_[pick(rng)]);
        out.push_back(period_);
      }
    }
    out.resize(static_cast<std::size_t>(n));
    return out;
  }

  const vocabulary& vocab_;
  std::vector<std::int32_t> task_, question_, digits_, word_pool_;
  std::vector<std::vector<std::int32_t>> fixed_;
  std::int32_t period_ = 0;
  std::int64_t needle_tokens_ = 0;
};

/// The prompts of a fixed set (`manifest.jsonl` + `L<length>_s<seed>.bin`), optionally only
/// those of the given lengths, in manifest order. A retrieval set's manifest
/// (make_retrieval_prompts.py) names its needle `target_span`: the needle holding the answer.
inline std::vector<passkey_prompt> load_prompt_set(const std::filesystem::path& dir, const std::vector<std::int64_t>& lengths,
                                                   int vocab_size) {
  const auto manifest = dir / "manifest.jsonl";
  std::ifstream in(manifest);
  if (!in) throw std::runtime_error(manifest.string() + ": cannot open prompt-set manifest");
  std::vector<passkey_prompt> prompts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = manifest.string() + ":" + std::to_string(n);
    passkey_prompt p;
    try {
      const auto j = nlohmann::json::parse(line);
      p.name = j.at("file").get<std::string>();
      p.length = j.at("length").get<std::int64_t>();
      p.answer = j.at("answer_ids").get<std::vector<std::int32_t>>();
      if (j.contains("target_span")) {  // a retrieval set (make_retrieval_prompts.py): the needle is the target's value needle
        const auto span = j.at("target_span").get<std::vector<std::int64_t>>();
        if (span.size() != 2) throw std::runtime_error(where + ": target_span must be [start, end)");
        p.needle_start = span[0];
        p.needle_end = span[1];
        if (j.contains("task")) p.task = j.at("task").get<std::string>();
        auto read_span = [&](const nlohmann::json& x, const char* what) {
          const auto s = x.get<std::vector<std::int64_t>>();
          if (s.size() != 2 || s[0] < 0 || s[0] >= s[1]) throw std::runtime_error(where + ": " + what + " must be [start, end) with start < end");
          return std::pair{s[0], s[1]};
        };
        if (j.contains("alias_span") && !j.at("alias_span").is_null()) p.alias_span = read_span(j.at("alias_span"), "alias_span");
        if (j.contains("distractor_spans"))
          for (const auto& x : j.at("distractor_spans")) p.distractor_spans.push_back(read_span(x, "a distractor span"));
      } else {
        p.needle_start = j.at("needle_start").get<std::int64_t>();
        p.needle_end = j.at("needle_end").get<std::int64_t>();
      }
      p.depth = j.at("depth").get<double>();
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(where + ": bad manifest line: " + e.what());
    }
    if (!lengths.empty() && std::find(lengths.begin(), lengths.end(), p.length) == lengths.end()) continue;
    p.tokens = load_tokens(dir / p.name, vocab_size);
    if (static_cast<std::int64_t>(p.tokens.size()) != p.length - passkey_task::answer_tokens)
      throw std::runtime_error(where + ": " + p.name + " has " + std::to_string(p.tokens.size()) + " tokens, manifest says length " +
                               std::to_string(p.length) + " (prompt + 5 answer tokens)");
    if (p.answer.size() != passkey_task::answer_tokens)
      throw std::runtime_error(where + ": answer_ids must hold 5 tokens");
    prompts.push_back(std::move(p));
  }
  return prompts;
}

}  // namespace llama2c
