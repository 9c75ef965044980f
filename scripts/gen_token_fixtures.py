#!/usr/bin/env python3
"""Generate tokenizer fixtures for flea-tokenizer from llama.cpp itself.

For every model it writes tests/fixtures/tokens/<model>.json holding llama.cpp's token ids
(through llama-cpp-python) for a deterministic corpus of varied strings, with
add_special / parse_special combinations, and how llama.cpp's token_to_piece(special=True)
spells those ids back (to test detokenization).

Usage:
    pip install /root/.cache/flea/wheels/llama_cpp_python-*.whl
    python3 scripts/gen_token_fixtures.py [--models-dir DIR] [--out DIR] [MODEL.gguf ...]

It also writes "variant" fixtures, <model>.<variant>.json: the same vocabulary with some
tokenizer keys replaced (`tokenizer.ggml.pre` = gpt-2 / llama-bpe / default, or the
add_bos / add_eos / add_space_prefix flags), so that configurations no shipped model uses
are still checked against llama.cpp. The variant GGUF (metadata only, no tensors) is
written to a temporary directory with the `gguf` package; the fixture's "overrides" says
which keys changed and the Rust test rebuilds the tokenizer from the base model with them.

The corpus depends only on SEED and this file; re-running gives byte-identical fixtures
for the same llama.cpp build.
"""

import argparse
import ctypes
import hashlib
import json
import os
import random
import sys
import tempfile

SEED = 20240611
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp commit vendored by llama-cpp-python 0.3.36
DEFAULT_MODELS = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    "gemma-3-270m.Q4_K_M.gguf",
]

# (base model, variant name, metadata keys to replace)
VARIANTS = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "pre-gpt-2", {"tokenizer.ggml.pre": "gpt-2"}),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "pre-default", {"tokenizer.ggml.pre": "default"}),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "add-bos-eos",
     {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}),
    ("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "pre-llama-bpe",
     {"tokenizer.ggml.pre": "llama-bpe"}),
    ("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "pre-gpt-2", {"tokenizer.ggml.pre": "gpt-2"}),
    ("gemma-3-270m.Q4_K_M.gguf", "space-prefix",
     {"tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_eos_token": True}),
]

SPECIAL_STRINGS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<reponame>",
    "<repo_name>", "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>",
    "<jupyter_code>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>",
    "<unk>", "<mask>", "[multimodal]", "<start_of_image>", "<end_of_image>",
    "<unused0>", "<unused12>", "<|vision_start|>", "<tool_call>", "</tool_call>",
    "<|box_start|>", "<s>", "</s>", "<|eot_id|>", "<0x0A>", "<0xFF>", "<|im_start",
    "im_end|>", "<|", "|>", "<<|im_end|>>", "<start_of_turn", "<table>", "<h1>", "</td>",
]

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come "
    "made may part tokenizer inference quantization matrix vector kernel latency throughput "
    "Rust llama gguf Paris Zürich naïve café résumé façade coöperate jalapeño"
).split()

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "It's a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "I'm sure you'll agree: they've done what we'd hoped, and it's THEIR'S now.",
    "In 1969, Apollo 11 landed on the Moon; 600,000,000 people watched.",
    "Dr. Smith's lab (room 4B) opens at 9:30 a.m. -- don't be late!!!",
    "She said: \"Well... I DON'T know,\" and left.",
    "E = mc^2, a^2 + b^2 = c^2, and 3.14159 < pi < 3.1416.",
    "Email me at john.doe+test@example.com or visit https://example.org/path?q=1&r=2#frag",
    "WE'RE GOING TO THE STORE'S BACK ROOM, AREN'T WE?",
]

CODE = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE 'A%' ORDER BY id DESC;",
    "<!DOCTYPE html>\n<html>\n  <body>\n    <h1 class=\"title\">Hi</h1>\n  </body>\n</html>\n",
    "for i in $(seq 1 10); do echo \"$i\" >> out.txt; done && cat out.txt | wc -l",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\\n\"}}",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "public static void main(String[] args) { System.out.println(args.length); }",
    "    x = [i**2 for i in range(100) if i % 3 == 0]  # squares\n",
    "let x = 0x1F; let y = 0b1010_1010; let z = 1_000_000u64;",
    "\\begin{equation}\n  \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2}\n\\end{equation}",
    "diff --git a/x.rs b/x.rs\n--- a/x.rs\n+++ b/x.rs\n@@ -1,3 +1,4 @@\n-old\n+new\n",
    "  if (a && !b || c != d) { return a->b[c]; } // comment\r\n",
]

UNICODE = [
    "你好，世界！今天天气很好。", "我爱自然语言处理和机器学习。",
    "こんにちは世界。カタカナとひらがな。", "東京タワーは333メートルです。",
    "안녕하세요 세계! 한국어 텍스트입니다.", "مرحبا بالعالم! هذا نص عربي.",
    "السلام عليكم ١٢٣٤٥٦٧٨٩٠", "नमस्ते दुनिया! यह हिंदी पाठ है। १२३",
    "שלום עולם! זהו טקסט בעברית.", "Привет, мир! Это русский текст.",
    "Γειά σου Κόσμε! Ελληνικά.", "สวัสดีชาวโลก ภาษาไทย", "Xin chào thế giới! Tiếng Việt có dấu.",
    "ሰላም ለዓለም", "გამარჯობა მსოფლიო", "Բարեւ աշխարհ", "ສະບາຍດີ", "ជំរាបសួរ",
    "😀😃😄😁😆😅😂🤣", "👨‍👩‍👧‍👦 family", "👩🏽‍💻 coder", "🏳️‍🌈 flag", "🇺🇸🇬🇧🇯🇵🇩🇪",
    "❤️‍🔥 heart on fire", "👍🏻👍🏼👍🏽👍🏾👍🏿", "e\u0301 vs é", "Z\u0351\u0358a\u0315\u0322l\u0334g\u0361o\u0300",
    "a\u0300\u0301\u0302\u0303\u0304", "\u0301 lone combining", "Å Å Å", "ﬁ ﬂ ﬀ ligatures",
    "ℌ𝔢𝔩𝔩𝔬 𝕨𝕠𝕣𝕝𝕕", "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ１２３", "½ ¼ ¾ ² ³ ¹ ⅓ Ⅻ ⑤",
    "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x|", "€100 £50 ¥1000 ₹500 ₿0.01", "©®™ §¶ †‡ •…",
    "\u200bzero\u200bwidth\u200b", "\u00a0nbsp\u00a0", "soft\u00adhyphen", "\ufeffBOM at start",
    "\ue000 private use \U000f0000", "\u0378 unassigned", "\uffff noncharacter", "\U0010fffd",
    "𝌆 tetragram", "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1", "ÿþý ÀÁÂ ĀĂĄ",
]

WHITESPACE = [
    " ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r",
    " \n", "\n ", " \t \n ", "\t\n\t", "\u3000", "\u00a0", "\u2028", "\u2029", "\u0085",
    "\x0b", "\x0c", "\x1c", "\u2003\u2009", " " * 17, "\n" * 9, "\t" * 7, " \u3000 ",
]

CONTRACTIONS = [
    "it's", "they're", "we've", "you'll", "he'd", "can't", "I'm", "IT'S", "THEY'RE",
    "WE'VE", "YOU'LL", "HE'D", "I'M", "It'S", "'s", "'S", "'re", "'ll", "'d", "'m", "'t",
    "'ve", "''s", "rock'n'roll", "o'clock", "'hello'", " 's", "x's's", "don't't", "'LL'",
    "l'été", "'", "''", "'''", "`quoted`", "’s curly",
]

PUNCT = [
    "!!!", "???", "...", "…", "---", "--", "==", "!=", "<=", ">=", "->", "=>", "::", ";;",
    "()", "[]", "{}", "<>", "\"\"", "''", "@#$%^&*", "~`|\\", "/*", "*/", "//", "#!",
    "、。「」", "！？", "¿¡", "«»", "„“", "§§", "<<<>>>", "***", "___", "+-+-", "$$$",
]


def numbers(rng):
    out = []
    for n in range(1, 31):
        out.append("".join(rng.choice("0123456789") for _ in range(n)))
    out += ["0", "00", "007", "3.14", "-42", "1e10", "1,234,567", "12:34:56", "2024-06-11",
            "v1.2.3", "0xDEADBEEF", "١٢٣", "१२३", "１２３", "²³", "123abc456", "a1b2c3",
            " 1", "  12", " 123 ", "1 2 3", "1\n2", "99.99%", "#1", "$5", "10^9"]
    return out


def long_strings(rng):
    return [
        "a" * 1000, "ab" * 400, "supercalifragilisticexpialidocious" * 20,
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(800)),
        "9" * 500, " " * 300, "\n" * 200, "😀" * 100, "中" * 300, "-" * 400,
        " ".join(rng.choice(WORDS) for _ in range(400)),
    ]


def invalid_looking():
    return [
        "\\xff\\xfe", "<0xFF>", "<0x0A>text", "▁", "▁▁▁", "▁hello", "Ġ", "Ċ", "Ġhello", "ĊĠ",
        "\ufffd", "\ufffd\ufffd", "[UNK]", "<unk>", "%00", "\\u0000", "\x00", "\x00\x01\x02",
        "\x7f", "\x1b[31mred\x1b[0m", "&amp;&lt;&gt;", "&#x1F600;", "\\n\\t", "NaN", "null",
    ]


def random_mix(rng, pools, max_parts):
    parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, max_parts))]
    seps = ["", " ", "\n", "  ", "\t", ", ", "\r\n", ""]
    return "".join(p + rng.choice(seps) for p in parts)


def fuzz_corpus(seed, n):
    """A larger random corpus for differential fuzzing (--fuzz N); not committed."""
    rng = random.Random(seed)
    pools = [PROSE, CODE, UNICODE, WHITESPACE, WHITESPACE, CONTRACTIONS, PUNCT,
             numbers(rng), SPECIAL_STRINGS, SPECIAL_STRINGS, WORDS, invalid_looking()]
    out = []
    for _ in range(n):
        s = random_mix(rng, pools, 10)
        # Random cuts make partial special tokens, split clusters and odd whitespace runs.
        if rng.random() < 0.3 and s:
            a = rng.randrange(len(s))
            s = s[a:a + rng.randint(1, 60)]
        out.append(s)
    return out


def build_corpus():
    rng = random.Random(SEED)
    corpus = [""]
    corpus += [chr(c) for c in range(0x20, 0x7F)]
    corpus += ["\n", "\t", "é", "中", "😀", "ß", "Σ", "ا", "\u200d", "\u0301"]
    corpus += PROSE + CODE + UNICODE + WHITESPACE + CONTRACTIONS + PUNCT
    corpus += numbers(rng) + long_strings(rng) + invalid_looking()
    corpus += SPECIAL_STRINGS
    # Special token strings embedded in text.
    for s in SPECIAL_STRINGS:
        corpus.append(f"Hello {s} world")
        corpus.append(f"{s}\n{rng.choice(PROSE)}")
        corpus.append(f"x{s}{s}y")
    corpus += [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<|endoftext|><|endoftext|>",
        "<|im_start|><|im_end|>",
        " <|im_start|> ",
        "\n<start_of_turn>\n",
        "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return x<|fim_middle|>",
    ]
    # Whitespace around words: leading/trailing, mixed.
    for w in WHITESPACE:
        corpus.append(w + "word" + w)
        corpus.append("a" + w + "b")
        corpus.append(w + rng.choice(WORDS) + " " + rng.choice(WORDS) + w + w)
    # Word sequences.
    for _ in range(120):
        corpus.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))))
    # Random mixes of every category.
    pools = [PROSE, CODE, UNICODE, WHITESPACE, CONTRACTIONS, PUNCT, numbers(rng),
             SPECIAL_STRINGS, WORDS, invalid_looking()]
    for _ in range(450):
        corpus.append(random_mix(rng, pools, 6))
    # Random codepoint soup from many scripts and classes.
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F),
              (0x2190, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF),
              (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x1D400, 0x1D4FF)]
    for _ in range(150):
        s = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            s.append(chr(cp))
        corpus.append("".join(s))
    # De-duplicate, keeping order.
    seen = set()
    out = []
    for t in corpus:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def cases_for(corpus):
    """(text, add_special, parse_special) triples."""
    cases = []
    for i, t in enumerate(corpus):
        cases.append((t, False, False))
        if "<" in t or "[" in t:
            cases.append((t, False, True))
        if i % 7 == 0:
            cases.append((t, True, i % 14 == 0))
    return cases


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_variant(src, dst, overrides):
    """Copy the metadata of `src` (no tensors) into `dst`, replacing/adding `overrides`
    (string or bool values)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        t = f.types[0]
        if key in overrides:
            continue
        if t == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                vals = [bytes(f.parts[i]) for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(key, vals, t, sub_type=sub)
        elif t == GGUFValueType.STRING:
            w.add_key_value(key, bytes(f.parts[f.data[0]]).decode(), t)
        else:
            w.add_key_value(key, f.parts[f.data[0]].tolist()[0], t)
    for key, value in overrides.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=os.environ.get(
        "FLEA_MODELS", os.path.expanduser("~/.cache/flea/models")))
    ap.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokens"))
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the pre-tokenizer variant fixtures")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N",
                    help="instead of the fixed corpus, use N random strings (seed --seed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    corpus = fuzz_corpus(args.seed, args.fuzz) if args.fuzz else build_corpus()
    cases = cases_for(corpus)
    os.makedirs(args.out, exist_ok=True)
    print(f"corpus: {len(corpus)} strings, {len(cases)} cases", file=sys.stderr)

    jobs = [(name, None, None) for name in args.models]
    if not args.no_variants:
        try:
            import gguf  # noqa: F401
            jobs += [v for v in VARIANTS if v[0] in args.models]
        except ImportError:
            print("gguf package missing: skipping pre-tokenizer variants", file=sys.stderr)
    tmpdir = tempfile.TemporaryDirectory()

    for name, variant, overrides in jobs:
        path = name if os.path.isabs(name) else os.path.join(args.models_dir, name)
        load_path = path
        if variant is not None:
            load_path = os.path.join(tmpdir.name, f"variant-{variant}.gguf")
            write_variant(path, load_path, overrides)
        llm = Llama(model_path=load_path, vocab_only=True, verbose=False)
        vocab = llm._model.vocab

        def piece(tok):
            # Own buffer handling: llama-cpp-python's helper truncates at 32 bytes.
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, tok, buf, size, 0, True)
                if n < 0:
                    size = -n
                    continue
                return buf.raw[:n]

        out_cases = []
        for text, add_special, parse_special in cases:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            case = {"text": text, "add_special": add_special,
                    "parse_special": parse_special, "ids": ids}
            detok = b"".join(piece(t) for t in ids)
            if not add_special and detok != text.encode("utf-8"):
                # How llama.cpp spells these ids back, when it is not the input text.
                case["detok_hex"] = detok.hex()
            out_cases.append(case)
        meta = llm.metadata
        n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)

        def opt(tok):
            return None if tok < 0 else tok

        vocab_info = {
            "n_tokens": n_tokens,
            "bos": opt(llama_cpp.llama_vocab_bos(vocab)),
            "eos": opt(llama_cpp.llama_vocab_eos(vocab)),
            "eot": opt(llama_cpp.llama_vocab_eot(vocab)),
            "pad": opt(llama_cpp.llama_vocab_pad(vocab)),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
            "eog_ids": [t for t in range(n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, t)],
            "control_ids": [t for t in range(n_tokens)
                            if llama_cpp.llama_vocab_is_control(vocab, t)],
        }
        doc = {
            "model": os.path.basename(path),
            "sha256": sha256(path),
            "size": os.path.getsize(path),
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_commit": LLAMA_CPP_COMMIT,
            "generator": "scripts/gen_token_fixtures.py",
            "seed": args.seed if args.fuzz else SEED,
            "fuzz": args.fuzz,
            "tokenizer_model": meta.get("tokenizer.ggml.model"),
            "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
            "overrides": overrides,
            "n_vocab": llm.n_vocab(),
            "bos": llm.token_bos(),
            "eos": llm.token_eos(),
            "vocab": vocab_info,
            "api": "Llama(vocab_only=True).tokenize(text.encode(), add_bos=add_special, "
                   "special=parse_special); detok = llama_token_to_piece(special=True)",
            "cases": out_cases,
        }
        stem = os.path.basename(path)
        if stem.endswith(".gguf"):
            stem = stem[: -len(".gguf")]
        if variant is not None:
            stem += "." + variant
        dst = os.path.join(args.out, stem + ".json")
        with open(dst, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        n_ids = sum(len(c["ids"]) for c in out_cases)
        print(f"{dst}: {len(out_cases)} cases, {n_ids} ids, "
              f"{os.path.getsize(dst) / 1e6:.2f} MB", file=sys.stderr)
        del llm


if __name__ == "__main__":
    main()
