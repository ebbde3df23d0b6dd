// gen_golden.mjs - regenerates golden.json: the ids @lenml/tokenizers gives for corpus.json.
//
// The oracle is independent of kvd's C code: @lenml/tokenizers (a dependency-free port of
// transformers.js' tokenizers, pinned in package.json/package-lock.json) loads the same
// tokenizer.json the C tokenizer loads and encodes every corpus string. Run:
//
//   cd tests/oracle && npm ci && node gen_golden.mjs [path/to/tokenizer.json]
//
// The default tokenizer path is ../../third_party/qwen-tokenizer/tokenizer.json (fetched by
// scripts/fetch-tokenizer.sh). Besides the plain encoding, each case records:
//   - ids_no_special: the encoding when special tokens (added tokens with "special": true)
//     are plain text, as Hugging Face's encode_special_tokens does; non-special added tokens
//     (<tool_call>, <think>, ...) are still matched. Built from a copy of tokenizer.json
//     whose added_tokens keep only the non-special ones.
//   - decoded_hex: decode(ids) with special tokens kept, i.e. the NFC text the ids stand
//     for, as hex of its UTF-8 (text_hex is the input's).
// "variants" check what the stock file and the stock oracle cannot: a copy of
// tokenizer.json with changed added_tokens (added-token options the file never sets; the
// C test applies the same change to its own copy), and the oracle with its regex's \s
// spelled out as Unicode White_Space, the \s of Hugging Face's regex engines (Oniguruma,
// Rust regex) and of PCRE2, where ECMAScript's differs (the C test uses the stock file).
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { TokenizerLoader } from "@lenml/tokenizers";

const here = dirname(fileURLToPath(import.meta.url));
const tokenizerPath =
  process.argv[2] ?? join(here, "../../third_party/qwen-tokenizer/tokenizer.json");
const configPath = join(dirname(tokenizerPath), "tokenizer_config.json");

const tokenizerBytes = readFileSync(tokenizerPath);
const tokenizerJSON = JSON.parse(tokenizerBytes.toString("utf8"));
const tokenizerConfig = JSON.parse(readFileSync(configPath, "utf8"));
const corpus = JSON.parse(readFileSync(join(here, "corpus.json"), "utf8"));

// Loading reuses the parsed objects; keep pristine copies for every variant.
const clone = (x) => structuredClone(x);
const load = (json) =>
  TokenizerLoader.fromPreTrained({ tokenizerJSON: clone(json), tokenizerConfig: clone(tokenizerConfig) });

const encode = (tok, text) => Array.from(tok.encode(text, { add_special_tokens: false }));
const decode = (tok, ids) =>
  ids.length === 0
    ? ""
    : tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });

const full = load(tokenizerJSON);
const noSpecialJSON = clone(tokenizerJSON);
noSpecialJSON.added_tokens = noSpecialJSON.added_tokens.filter((t) => !t.special);
const noSpecial = load(noSpecialJSON);

const cases = corpus.cases.map(({ cat, text }) => {
  const ids = encode(full, text);
  return {
    cat,
    text,
    // C strings from cJSON stop at U+0000: the test reads the exact bytes from hex.
    text_hex: Buffer.from(text, "utf8").toString("hex"),
    ids,
    ids_no_special: encode(noSpecial, text),
    decoded_hex: Buffer.from(decode(full, ids), "utf8").toString("hex"),
  };
});

// Each variant: how the C test must edit added_tokens, and strings to check.
const variantSpecs = [
  {
    // lstrip/rstrip: the token swallows the whitespace around it.
    name: "im_end_lstrip_rstrip",
    set_flags: { "<|im_end|>": { lstrip: true, rstrip: true } },
    texts: [
      "hi <|im_end|> there",
      "hi\n\n<|im_end|>\n\nthere",
      "a \t <|im_end|>",
      "<|im_end|>   b",
      "x <|im_end|> <|im_end|> y",
      "\u3000<|im_end|>\u00a0z",
      "no spaces<|im_end|>here",
    ],
  },
  {
    // Oracle for single_word (which the JS port ignores): where a single_word token is
    // glued to a word character it must not match, so the ids equal those of a tokenizer
    // without that token; the C test checks the free-standing cases separately.
    name: "without_think",
    remove: ["<think>"],
    texts: ["a<think>", "<think>b", "x<think>y", "think<think>think", "_<think>", "é<think>"],
  },
  {
    // ECMAScript's \s is not Unicode's White_Space (what Oniguruma, Rust's regex and PCRE2
    // match): it adds U+FEFF and lacks U+0085. Spelling \s out as White_Space makes the JS
    // regex behave like Hugging Face's; the C test encodes these strings with the stock
    // tokenizer.json. ids_ecmascript records what the stock JS oracle says instead.
    name: "white_space_regex",
    white_space_regex: true,
    texts: [
      "\ufeff'm",
      "a\ufeff'll b",
      "x\u0085'll",
      "=$+\u0085'll",
      "?qwen+\u03bb    \u0085\u65e5\u672c",
      "tab\t\ufeff'S",
    ],
  },
];
// Unicode White_Space, for a JS character class.
const WHITE_SPACE = "\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const withWhiteSpace = (pattern) =>
  pattern
    .replaceAll("[^\\s", "[^" + WHITE_SPACE)
    .replaceAll("\\S", "[^" + WHITE_SPACE + "]")
    .replaceAll("\\s", "[" + WHITE_SPACE + "]");
const variants = variantSpecs.map((spec) => {
  const json = clone(tokenizerJSON);
  if (spec.white_space_regex) {
    const split = json.pre_tokenizer.pretokenizers.find((p) => p.type === "Split");
    split.pattern.Regex = withWhiteSpace(split.pattern.Regex);
  }
  json.added_tokens = json.added_tokens
    .filter((t) => !(spec.remove ?? []).includes(t.content))
    .map((t) => ({ ...t, ...(spec.set_flags?.[t.content] ?? {}) }));
  const tok = load(json);
  return {
    name: spec.name,
    set_flags: spec.set_flags ?? {},
    remove: spec.remove ?? [],
    cases: spec.texts.map((text) => {
      const ids = encode(tok, text);
      if (!spec.white_space_regex) return { text, ids };
      const ids_ecmascript = encode(full, text);
      if (JSON.stringify(ids) === JSON.stringify(ids_ecmascript))
        throw new Error(`white_space_regex case ${JSON.stringify(text)} does not discriminate`);
      return { text, ids, ids_ecmascript };
    }),
  };
});

const golden = {
  generator: "tests/oracle/gen_golden.mjs",
  oracle: "@lenml/tokenizers@" +
    JSON.parse(readFileSync(join(here, "node_modules/@lenml/tokenizers/package.json"), "utf8")).version,
  node: process.version,
  tokenizer_sha256: createHash("sha256").update(tokenizerBytes).digest("hex"),
  vocab_size: Math.max(...tokenizerJSON.added_tokens.map((t) => t.id)) + 1,
  cases,
  variants,
};
// One case per line keeps diffs of regenerated goldens readable.
const lines = (items) => "[\n" + items.map((x) => JSON.stringify(x)).join(",\n") + "\n]";
const head = JSON.stringify({ ...golden, cases: 0, variants: 0 }, null, 1);
writeFileSync(
  join(here, "golden.json"),
  head.replace('"cases": 0', '"cases": ' + lines(cases)).replace('"variants": 0', '"variants": ' + lines(variants)) + "\n"
);
console.log(`golden.json: ${cases.length} cases, ${variants.length} variants`);
