// SPDX-License-Identifier: MIT
// The vocabulary inside a GGUF file, for text in and text out. tokenizer.ggml.model "llama":
// SentencePiece BPE with scores, as llama.cpp's llm_tokenizer_spm runs it:
//   1. spaces become U+2581 "▁", and one is put in front (tokenizer.ggml.add_space_prefix, on
//      by default);
//   2. the text is split into UTF-8 characters (a byte that starts no valid character is a
//      symbol of its own);
//   3. repeatedly, of all adjacent pairs whose concatenation is a vocabulary token, the one with
//      the highest score is merged (ties: the leftmost);
//   4. each final symbol is its token, or, when it is none (a character the vocabulary lacks),
//      its bytes as the byte tokens "<0xXX>", or the unknown token where those are missing.
// Decoding reverses it: "▁" is a space, byte tokens are their byte, control tokens (BOS, EOS)
// print nothing, and the space put in front of the text is dropped.
//
// tokenizer.ggml.model "gpt2": byte-level BPE, as llama.cpp's llm_tokenizer_bpe runs it:
//   1. the text is split into words by the pre-tokenizer tokenizer.ggml.pre names: GPT-2's
//      regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+;
//      "gpt-2", "smollm", "starcoder", ... and files that name none), Llama 3's ("llama-bpe",
//      "llama3": letters may take one leading non-letter, digits in runs of at most 3, newlines
//      apart) or Qwen2's ("qwen2": Llama 3's with single digits), hand-written as llama.cpp's
//      unicode.cpp writes them, with ICU for the Unicode letter / number classes;
//   2. each word's bytes are mapped to printable characters (GPT-2's bytes_to_unicode) and
//      merged pairwise, the pair of lowest rank in tokenizer.ggml.merges first (ties: leftmost);
//      with Llama 3's pre-tokenizer a word that is itself a token is taken whole;
//   3. decoding maps the characters back to bytes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <unicode/uchar.h>

#include "gguf_file.hpp"

namespace gguf {

class tokenizer {
 public:
  /// Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
  enum class token_kind : std::int32_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

  /// The vocabulary of `file`, which must have `vocab_size` tokens (the embedding's rows).
  tokenizer(const contents& file, int vocab_size) {
    const std::string& model = file.string("tokenizer.ggml.model");
    if (model != "llama" && model != "gpt2")
      throw format_error(error_kind::unsupported, "GGUF: tokenizer '" + model + "' is not read by this host (it reads \"llama\", SentencePiece BPE, and \"gpt2\", byte-level BPE)");
    byte_level_ = model == "gpt2";
    const auto& tokens = file.array_of("tokenizer.ggml.tokens", value_type::string);
    if (tokens.size() != static_cast<std::size_t>(vocab_size))
      throw format_error(error_kind::wrong_tensor_shape, "GGUF: " + std::to_string(tokens.size()) + " tokens for an embedding of " +
                                                             std::to_string(vocab_size) + " rows");
    pieces_.reserve(tokens.size());
    for (const auto& t : tokens) pieces_.push_back(std::get<std::string>(t.data));
    scores_.assign(pieces_.size(), 0.0f);
    if (file.find("tokenizer.ggml.scores")) {
      const auto& s = file.array_of("tokenizer.ggml.scores", value_type::float32);
      if (s.size() != pieces_.size()) throw format_error(error_kind::wrong_tensor_shape, "GGUF: tokenizer.ggml.scores is not one per token");
      for (std::size_t i = 0; i < s.size(); ++i) scores_[i] = static_cast<float>(std::get<double>(s[i].data));
    }
    kinds_.assign(pieces_.size(), token_kind::normal);
    if (file.find("tokenizer.ggml.token_type")) {
      const auto& k = file.array_of("tokenizer.ggml.token_type", value_type::int32);
      if (k.size() != pieces_.size()) throw format_error(error_kind::wrong_tensor_shape, "GGUF: tokenizer.ggml.token_type is not one per token");
      for (std::size_t i = 0; i < k.size(); ++i) kinds_[i] = static_cast<token_kind>(std::get<std::int64_t>(k[i].data));
    }
    for (std::size_t i = 0; i < pieces_.size(); ++i) ids_.emplace(pieces_[i], static_cast<std::int32_t>(i));
    const std::int64_t last = vocab_size - 1;
    bos_ = static_cast<std::int32_t>(file.integer_or("tokenizer.ggml.bos_token_id", 1, -1, last));
    eos_ = static_cast<std::int32_t>(file.integer_or("tokenizer.ggml.eos_token_id", 2, -1, last));
    unknown_ = static_cast<std::int32_t>(file.integer_or("tokenizer.ggml.unknown_token_id", 0, -1, last));
    add_bos_ = file.boolean_or("tokenizer.ggml.add_bos_token", true);
    add_space_prefix_ = file.boolean_or("tokenizer.ggml.add_space_prefix", !byte_level_);
    if (byte_level_) read_bpe(file);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      const auto it = ids_.find(name);
      byte_tokens_[b] = it == ids_.end() ? -1 : it->second;
    }
  }

  int size() const noexcept { return static_cast<int>(pieces_.size()); }
  std::int32_t bos() const noexcept { return bos_; }
  std::int32_t eos() const noexcept { return eos_; }
  bool adds_bos() const noexcept { return add_bos_ && bos_ >= 0; }
  const std::string& piece(std::int32_t id) const { return pieces_.at(static_cast<std::size_t>(id)); }
  std::optional<std::int32_t> find(std::string_view piece) const {
    const auto it = ids_.find(std::string(piece));
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }

  /// Token ids of `text` (BOS first when the file asks for it and `with_bos`).
  std::vector<std::int32_t> encode(std::string_view text, bool with_bos = true) const {
    std::vector<std::int32_t> out;
    if (with_bos && adds_bos()) out.push_back(bos_);
    if (text.empty()) return out;
    if (byte_level_) {
      encode_bpe(text, out);
      return out;
    }
    std::string normal;
    if (add_space_prefix_) normal += "\xE2\x96\x81";
    for (char c : text) {
      if (c == ' ') normal += "\xE2\x96\x81";
      else normal += c;
    }
    std::vector<symbol> symbols;
    for (std::size_t i = 0; i < normal.size();) {
      const std::size_t n = utf8_length(normal, i);
      symbols.push_back({i, n, static_cast<int>(symbols.size()) - 1, static_cast<int>(symbols.size()) + 1});
      i += n;
    }
    symbols.back().next = -1;
    // A pair merges when its concatenation is a token; the token's score is its priority.
    merge_pairs(symbols, [&](const symbol& a, const symbol& b) -> std::optional<double> {
      const auto it = ids_.find(normal.substr(a.begin, a.length + b.length));
      if (it == ids_.end()) return std::nullopt;
      return scores_[static_cast<std::size_t>(it->second)];
    });
    for (int i = 0; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) {
      const symbol& s = symbols[static_cast<std::size_t>(i)];
      const auto it = ids_.find(normal.substr(s.begin, s.length));
      if (it != ids_.end()) {
        out.push_back(it->second);
        continue;
      }
      for (std::size_t k = 0; k < s.length; ++k) {
        const std::int32_t byte = byte_tokens_[static_cast<unsigned char>(normal[s.begin + k])];
        out.push_back(byte >= 0 ? byte : unknown_);
        if (byte < 0) break;  // one unknown token for the whole symbol, as llama.cpp
      }
    }
    return out;
  }

  /// The words byte-level BPE encodes one by one (its pre-tokenizer); the whole text for "llama".
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> out;
    if (!byte_level_) return {std::string(text)};
    for (auto w : split_words(text)) out.emplace_back(w);
    return out;
  }

  /// The text of one token as it continues a sequence (`first`: right after BOS or at the
  /// start, where the space put in front is dropped). Byte tokens give their byte, so a UTF-8
  /// character split over tokens is whole once all are printed.
  std::string decode(std::int32_t id, bool first = false) const {
    const auto i = static_cast<std::size_t>(id);
    if (i >= pieces_.size()) return {};
    const token_kind kind = kinds_[i];
    if (kind == token_kind::control || kind == token_kind::unused) return {};
    const std::string& p = pieces_[i];
    if (kind == token_kind::byte && p.size() == 6 && p.rfind("<0x", 0) == 0)
      return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
    if (kind == token_kind::unknown) return "\xE2\x96\x85";  // llama.cpp prints unknown tokens as "▅"
    if (byte_level_) return unmap_bytes(p);
    std::string out;
    for (std::size_t k = 0; k < p.size();) {
      if (p.compare(k, 3, "\xE2\x96\x81") == 0) {
        out += ' ';
        k += 3;
      } else {
        out += p[k++];
      }
    }
    if (first && add_space_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

  /// The text of a sequence of tokens.
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out;
    bool first = true;
    for (std::int32_t id : ids) {
      out += decode(id, first);
      if (!is_control(id)) first = false;
    }
    return out;
  }

  bool is_unknown(std::int32_t id) const {
    const auto i = static_cast<std::size_t>(id);
    return i < kinds_.size() && kinds_[i] == token_kind::unknown;
  }

  bool is_control(std::int32_t id) const {
    const auto i = static_cast<std::size_t>(id);
    return i >= kinds_.size() || kinds_[i] == token_kind::control || kinds_[i] == token_kind::unused;
  }

 private:
  // A run of text as a linked list of symbols (byte ranges of the text being encoded).
  struct symbol {
    std::size_t begin, length;
    int previous, next;
  };

  // Both BPEs: repeatedly merges the adjacent pair of highest priority (ties: the leftmost),
  // `priority(left, right)` giving a pair's priority or nullopt for a pair that never merges.
  template <class Priority>
  static void merge_pairs(std::vector<symbol>& symbols, Priority&& priority) {
    struct candidate {
      double priority;
      int left;
      std::size_t length;  // the merged length when queued: a stale entry no longer matches
      bool operator<(const candidate& o) const { return priority < o.priority || (priority == o.priority && left > o.left); }
    };
    std::priority_queue<candidate> queue;
    auto propose = [&](int left) {
      if (left < 0 || symbols[static_cast<std::size_t>(left)].next < 0) return;
      const symbol& a = symbols[static_cast<std::size_t>(left)];
      const symbol& b = symbols[static_cast<std::size_t>(a.next)];
      if (const auto p = priority(a, b)) queue.push({*p, left, a.length + b.length});
    };
    for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) propose(i);
    while (!queue.empty()) {
      const candidate c = queue.top();
      queue.pop();
      symbol& a = symbols[static_cast<std::size_t>(c.left)];
      if (a.length == 0 || a.next < 0) continue;
      symbol& b = symbols[static_cast<std::size_t>(a.next)];
      if (a.length + b.length != c.length) continue;  // one of the two merged since (lengths only grow)
      a.length += b.length;
      b.length = 0;
      a.next = b.next;
      if (a.next >= 0) symbols[static_cast<std::size_t>(a.next)].previous = c.left;
      propose(a.previous);
      propose(c.left);
    }
  }

  // ---- byte-level BPE ------------------------------------------------------------------------

  enum class pre_tokenizer { gpt2, llama3, qwen2 };

  void read_bpe(const contents& file) {
    const auto& merges = file.array_of("tokenizer.ggml.merges", value_type::string);
    merge_ranks_.reserve(merges.size());
    for (std::size_t i = 0; i < merges.size(); ++i) merge_ranks_.emplace(std::get<std::string>(merges[i].data), static_cast<int>(i));
    const std::string pre = file.find("tokenizer.ggml.pre") ? file.string("tokenizer.ggml.pre") : "default";
    if (pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe") pre_ = pre_tokenizer::llama3;
    else if (pre == "qwen2" || pre == "deepseek-r1-qwen") pre_ = pre_tokenizer::qwen2;
    else if (pre == "default" || pre == "gpt-2" || pre == "gpt2" || pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "codeshell" ||
             pre == "mpt" || pre == "olmo")
      pre_ = pre_tokenizer::gpt2;
    else
      throw format_error(error_kind::unsupported, "GGUF: pre-tokenizer '" + pre + "' is not read by this host (gpt-2, smollm, llama-bpe, qwen2, ...)");
    // llama.cpp takes a word that is a token whole under Llama 3's pre-tokenizer (ignore_merges).
    whole_words_ = pre_ == pre_tokenizer::llama3;
    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the others for
    // U+0100 onwards in byte order.
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      byte_chars_[b] = utf8(c);
      char_bytes_.emplace(c, static_cast<unsigned char>(b));
    }
  }

  static std::string utf8(char32_t c) {
    std::string s;
    if (c < 0x80) s += static_cast<char>(c);
    else if (c < 0x800) s += static_cast<char>(0xC0 | (c >> 6)), s += static_cast<char>(0x80 | (c & 0x3F));
    else if (c < 0x10000) s += static_cast<char>(0xE0 | (c >> 12)), s += static_cast<char>(0x80 | ((c >> 6) & 0x3F)), s += static_cast<char>(0x80 | (c & 0x3F));
    else
      s += static_cast<char>(0xF0 | (c >> 18)), s += static_cast<char>(0x80 | ((c >> 12) & 0x3F)), s += static_cast<char>(0x80 | ((c >> 6) & 0x3F)),
          s += static_cast<char>(0x80 | (c & 0x3F));
    return s;
  }

  // Code points of UTF-8 text, with each code point's byte range; an invalid byte is U+FFFD
  // of one byte (its byte still goes to BPE as it is).
  struct code_point {
    char32_t value;
    std::size_t begin, end;
  };
  static std::vector<code_point> code_points(std::string_view text) {
    std::vector<code_point> out;
    for (std::size_t i = 0; i < text.size();) {
      const auto c = static_cast<unsigned char>(text[i]);
      std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
      bool valid = n > 0 && i + n <= text.size();
      for (std::size_t k = 1; valid && k < n; ++k) valid = (static_cast<unsigned char>(text[i + k]) >> 6) == 0x2;
      if (!valid) {
        out.push_back({0xFFFD, i, i + 1});
        ++i;
        continue;
      }
      char32_t v = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
      for (std::size_t k = 1; k < n; ++k) v = (v << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
      out.push_back({v, i, i + n});
      i += n;
    }
    return out;
  }

  struct flags {
    bool letter = false, number = false, whitespace = false, defined = false;
  };
  static flags flags_of(char32_t c) {
    flags f;
    const auto type = static_cast<UCharCategory>(u_charType(static_cast<UChar32>(c)));
    const std::uint32_t mask = U_MASK(type);
    f.letter = (mask & U_GC_L_MASK) != 0;
    f.number = (mask & U_GC_N_MASK) != 0;
    // \s as llama.cpp's table: the ASCII controls \t-\r, U+0085, and the Unicode White_Space spaces.
    f.whitespace = (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
                   c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
    f.defined = type != U_UNASSIGNED || f.whitespace;
    return f;
  }

  // The pre-tokenizer: word boundaries, as code point counts, following llama.cpp's
  // unicode_regex_split_custom_gpt2 / _llama3 step by step.
  std::vector<std::string_view> split_words(std::string_view text) const {
    const auto cps = code_points(text);
    const std::size_t n = cps.size();
    constexpr char32_t none = 0xFFFFFFFF;
    auto cpt = [&](std::size_t i) { return i < n ? cps[i].value : none; };
    auto fl = [&](std::size_t i) { return i < n ? flags_of(cps[i].value) : flags{}; };
    std::vector<std::string_view> words;
    std::size_t previous = 0;
    auto add = [&](std::size_t end) {
      const std::size_t length = end - previous;
      if (length > 0) {
        const std::size_t b = cps[previous].begin, e = cps[end - 1].end;
        words.push_back(text.substr(b, e - b));
      }
      previous = end;
      return length;
    };
    const bool llama3 = pre_ != pre_tokenizer::gpt2;
    const std::size_t digit_run = pre_ == pre_tokenizer::llama3 ? 3 : 1;
    auto lower = [&](char32_t c) { return c == none ? c : static_cast<char32_t>(u_tolower(static_cast<UChar32>(c))); };
    for (std::size_t pos = 0; pos < n;) {
      const char32_t c = cpt(pos);
      const flags f = fl(pos);
      if (c == '\'' && pos + 1 < n) {  // 's 't 're 've 'm 'll 'd (case-insensitive for Llama 3)
        const char32_t c1 = llama3 ? lower(cpt(pos + 1)) : cpt(pos + 1);
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
          pos += add(pos + 2);
          continue;
        }
        if (pos + 2 < n) {
          const char32_t c2 = llama3 ? lower(cpt(pos + 2)) : cpt(pos + 2);
          if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
            pos += add(pos + 3);
            continue;
          }
        }
      }
      if (llama3) {
        if (!(c == '\r' || c == '\n' || f.number) && (f.letter || fl(pos + 1).letter)) {  // [^\r\n\p{L}\p{N}]?\p{L}+
          ++pos;
          while (fl(pos).letter) ++pos;
          add(pos);
          continue;
        }
        if (f.number) {  // \p{N}{1,3} (Qwen2: \p{N})
          std::size_t start = pos;
          while (fl(pos).number) {
            if (++pos - start >= digit_run) {
              add(pos);
              start = pos;
            }
          }
          add(pos);
          continue;
        }
        flags f2 = c == ' ' ? fl(pos + 1) : f;  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        if (!(f2.whitespace || f2.letter || f2.number) && f.defined) {
          pos += c == ' ' ? 1 : 0;
          while (!(f2.whitespace || f2.letter || f2.number) && f2.defined) f2 = fl(++pos);
          while (cpt(pos) == '\r' || cpt(pos) == '\n') ++pos;
          add(pos);
          continue;
        }
      } else {
        flags f2 = c == ' ' ? fl(pos + 1) : f;
        if (f2.letter || f2.number) {  // ' ?\p{L}+' | ' ?\p{N}+'
          const bool letters = f2.letter;
          pos += c == ' ' ? 1 : 0;
          while (letters ? f2.letter : f2.number) f2 = fl(++pos);
          add(pos);
          continue;
        }
        if (!(f2.whitespace || f2.letter || f2.number) && f2.defined) {  // ' ?[^\s\p{L}\p{N}]+'
          pos += c == ' ' ? 1 : 0;
          while (!(f2.whitespace || f2.letter || f2.number) && f2.defined) f2 = fl(++pos);
          add(pos);
          continue;
        }
      }
      // Whitespace, both: Llama 3's \s*[\r\n]+ first, then \s+(?!\S) and \s+.
      std::size_t spaces = 0, last_newline_end = 0;
      while (fl(pos + spaces).whitespace) {
        const char32_t w = cpt(pos + spaces);
        if (llama3 && (w == '\r' || w == '\n')) last_newline_end = pos + spaces + 1;
        ++spaces;
      }
      if (last_newline_end > 0) {
        pos = last_newline_end;
        add(pos);
        continue;
      }
      if (spaces > 1 && cpt(pos + spaces) != none) {  // \s+(?!\S): all but the last
        pos += spaces - 1;
        add(pos);
        continue;
      }
      if (spaces > 0) {
        pos += spaces;
        add(pos);
        continue;
      }
      add(++pos);  // no match: the code point alone
    }
    return words;
  }

  void encode_bpe(std::string_view text, std::vector<std::int32_t>& out) const {
    for (std::string_view raw : split_words(text)) {
      std::string word;
      std::vector<std::size_t> starts;  // where each byte's character starts in `word`
      for (char b : raw) {
        starts.push_back(word.size());
        word += byte_chars_[static_cast<unsigned char>(b)];
      }
      if (whole_words_) {
        const auto it = ids_.find(word);
        if (it != ids_.end()) {
          out.push_back(it->second);
          continue;
        }
      }
      std::vector<symbol> symbols;
      for (std::size_t i = 0; i < starts.size(); ++i) {
        const std::size_t end = i + 1 < starts.size() ? starts[i + 1] : word.size();
        symbols.push_back({starts[i], end - starts[i], static_cast<int>(i) - 1, i + 1 < starts.size() ? static_cast<int>(i) + 1 : -1});
      }
      // A pair merges when "left right" is a merge rule; the lower its rank, the sooner.
      merge_pairs(symbols, [&](const symbol& a, const symbol& b) -> std::optional<double> {
        const auto it = merge_ranks_.find(word.substr(a.begin, a.length) + " " + word.substr(b.begin, b.length));
        if (it == merge_ranks_.end()) return std::nullopt;
        return -static_cast<double>(it->second);
      });
      for (int i = 0; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) {
        const symbol& s = symbols[static_cast<std::size_t>(i)];
        const auto it = ids_.find(word.substr(s.begin, s.length));
        if (it != ids_.end()) {
          out.push_back(it->second);
          continue;
        }
        // Not a token: its bytes' characters one by one (every byte-level vocabulary has them).
        for (std::size_t k = 0; k < starts.size(); ++k) {
          if (starts[k] < s.begin || starts[k] >= s.begin + s.length) continue;
          const auto byte = ids_.find(byte_chars_[static_cast<unsigned char>(raw[k])]);
          out.push_back(byte != ids_.end() ? byte->second : unknown_);
        }
      }
    }
  }

  std::string unmap_bytes(const std::string& piece) const {
    std::string out;
    for (const auto& cp : code_points(piece)) {
      const auto it = char_bytes_.find(cp.value);
      if (it != char_bytes_.end()) out += static_cast<char>(it->second);
      else out.append(piece, cp.begin, cp.end - cp.begin);  // not a byte character (an added token's text): as it is
    }
    return out;
  }

  // Bytes of the UTF-8 character starting at i; 1 for a byte that starts no valid character.
  static std::size_t utf8_length(const std::string& s, std::size_t i) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    if (i + n > s.size()) return 1;
    for (std::size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return 1;
    return n;
  }

  bool byte_level_ = false;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<token_kind> kinds_;
  std::unordered_map<std::string, std::int32_t> ids_;
  std::int32_t byte_tokens_[256];
  std::int32_t bos_ = 1, eos_ = 2, unknown_ = 0;
  bool add_bos_ = true, add_space_prefix_ = true;
  // byte-level BPE
  std::unordered_map<std::string, int> merge_ranks_;
  std::string byte_chars_[256];
  std::unordered_map<char32_t, unsigned char> char_bytes_;
  pre_tokenizer pre_ = pre_tokenizer::gpt2;
  bool whole_words_ = false;
};

}  // namespace gguf
