"""Text the tokenizer tests run on (the 29 languages of the Qwen2 report, code, edge
cases), and a tiny byte-level BPE tokenizer trained on it.

The Qwen2 technical report lists, beyond Chinese and English: Western Europe (German,
French, Spanish, Portuguese, Italian, Dutch), Eastern and Central Europe (Russian, Czech,
Polish), the Middle East (Arabic, Persian, Hebrew, Turkish), East Asia (Japanese, Korean),
South-East Asia (Vietnamese, Thai, Indonesian, Malay, Lao, Burmese, Cebuano, Khmer,
Tagalog) and South Asia (Hindi, Bengali, Urdu).

No expected ids live here: every test computes them with Hugging Face on the same files.
``CORPUS`` maps a short name (the pytest id) to the text.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from minqwen2.bpe import PRETOKENIZE_REGEX

LANGUAGES: dict[str, str] = {
    # East Asia
    "chinese": "通义千问是阿里云研发的大语言模型。今天天气很好，我们去公园散步吧！"
    "繁體中文：語言模型的訓練需要大量資料。生僻字：龘䶮𠀾𪚥。",
    "japanese": "日本語のテキストです。ひらがな、カタカナ、漢字が混ざっています。ｶﾀｶﾅ（半角）も、ヴァイオリンも。",
    "korean": "안녕하세요! 한국어는 한글로 씁니다. 다람쥐 헌 쳇바퀴에 타고파. 값어치, 읽다, 닭.",
    # English
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., and we'll need 2,048 tokens—"
    "don't we? THEY'RE HERE; you'LL see. e-mail: someone@example.com",
    # Western Europe
    "german": "Größenwahnsinnige Straßenbahnfahrer überqueren die Brücke. Übung macht den Meister: äöü ÄÖÜ ß ẞ.",
    "french": "Où est la bibliothèque ? L'élève a déjà lu « Les Misérables » à Noël, n'est-ce pas ? Œuvre, cœur.",
    "spanish": "¿Dónde está la estación? El niño comió piñas y jalapeños en el año 2023. ¡Qué día tan bonito!",
    "portuguese": "A inteligência artificial não substitui a criatividade humana; ela a amplia. Ação, coração, pão.",
    "italian": "Perché l'università è chiusa? Però andremo lì più tardi, così vedremo la città già illuminata.",
    "dutch": "De kat zit op de mat. Het ijsje was heerlijk, maar geïnteresseerde coöperaties wachten nog.",
    # Eastern and Central Europe
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёлка стоит в углу.",
    "czech": "Příliš žluťoučký kůň úpěl ďábelské ódy. Čtvrtek je můj oblíbený den.",
    "polish": "Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig.",
    # Middle East
    "arabic": "مرحبا بالعالم! اللغة العربية جميلة، وهي تُكتب من اليمين إلى اليسار. العدد ١٢٣.",
    "persian": "زبان فارسی زیباست. می\u200cخواهم کتاب بخوانم. عدد ۴۵۶ را بنویس.",
    "hebrew": "שלום עולם! עברית נכתבת מימין לשמאל, ולפעמים עם ניקוד: שָׁלוֹם.",
    "turkish": "Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ılık bir gün; IĞDIR, ığdır.",
    # South-East Asia
    "vietnamese": "Tiếng Việt có nhiều dấu thanh: à, á, ả, ã, ạ. Tôi yêu Hà Nội và Thành phố Hồ Chí Minh.",
    "thai": "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ สวัสดีครับ ยินดีที่ได้รู้จัก ๑๒๓",
    "indonesian": "Saya suka makan nasi goreng di Jakarta. Apa kabar hari ini? Terima kasih banyak!",
    "malay": "Selamat pagi! Saya sedang belajar bahasa Melayu di Kuala Lumpur bersama kawan-kawan.",
    "lao": "ສະບາຍດີ ພາສາລາວແມ່ນພາສາທາງການຂອງປະເທດລາວ ຂອບໃຈຫຼາຍໆ",
    "burmese": "မင်္ဂလာပါ မြန်မာဘာသာစကားကို ကျွန်တော် လေ့လာနေပါတယ်။ ၁၂၃",
    "cebuano": "Maayong buntag! Unsa imong pangalan? Nindot kaayo ang panahon karon sa Sugbo.",
    "khmer": "សួស្តី ភាសាខ្មែរជាភាសាផ្លូវការរបស់ប្រទេសកម្ពុជា។ អរគុណច្រើន",
    "tagalog": "Magandang umaga po! Kumusta ka? Mahal ko ang Pilipinas at ang mga tao rito.",
    # South Asia
    "hindi": "नमस्ते दुनिया! हिन्दी देवनागरी लिपि में लिखी जाती है। संख्या ४२ है।",
    "bengali": "আমি বাংলায় গান গাই। বাংলা ভাষা খুব মিষ্টি। ১২৩",
    "urdu": "اردو ایک خوبصورت زبان ہے۔ آپ کیسے ہیں؟ شکریہ!",
}

CODE: dict[str, str] = {
    "python": 'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    '    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nprint(f"{fib(30)=}")  # 832040\n',
    "c": '#include <stdio.h>\n\nint main(void) {\n\tprintf("Hello, %s!\\n", "world");\n\treturn 0;\n}\n',
    "json": '{"name": "minqwen2", "version": [0, 1, 0], "ok": true, "nested": {"π": 3.14159, "list": []}}',
    "shell": "for f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}' >> /tmp/out.log 2>&1\ndone && echo $((1<<10))",
    "html": '<!DOCTYPE html>\n<html lang="zh">\n  <body><p class="x">你好 &amp; bye</p></body>\n</html>',
    "rust": "fn main() {\n    let v: Vec<u32> = (1..=10).filter(|x| x % 2 == 0).collect();\n"
    '    println!("{:?}", v);\n}\n',
    "sql_and_regex": "SELECT id, COUNT(*) FROM t WHERE name LIKE '%ab_c%' GROUP BY id;\n"
    r"re.compile(r'^(?P<y>\d{4})-(\d\d)$')",
}

EDGE_CASES: dict[str, str] = {
    "empty": "",
    "one_space": " ",
    "only_newlines": "\n\n\n",
    "whitespace_runs": "a  b   c    d\t\te \t \n  \n  z   ",
    "leading_trailing_spaces": "   indented text with trailing spaces   ",
    "crlf": "line one\r\nline two\r\n\r\nline four\r",
    "lone_cr": "a\rb\r\rc",
    "tabs_and_vertical_space": "col1\tcol2\t\tcol3\x0bnext\x0cpage\u2028sep\u2029para\u0085nel",
    "single_digits": "12345 abc123 3.14159 2024-06-07 1,000,000 0x1F 1e-9 007",
    "other_digits": "１２３ ٤٥٦ ۷۸۹ ४२ ๑๒ ½ ² ⅷ",
    "contractions": "I'm  you'LL DON'T we've they'd it's 'tis o'clock rock'n'roll",
    "decomposed_latin": "e\u0301te\u0301 A\u030angstro\u0308m n\u0303o\u0303 Cafe\u0301",
    "decomposed_hangul": "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af",
    "decomposed_vietnamese": "Tie\u0302\u0301ng Vie\u0323\u0302t",
    "nfc_but_not_nfkc": "ﬁ ﬂ ㎏ ² ｆｕｌｌ Ⅻ",
    "combining_sequences": "a\u0301\u0302\u0303 Z\u0351\u036b\u0343 \u0915\u094d\u0937",
    "emoji_zwj": "👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🧑‍🤝‍🧑 ❤️‍🔥 🐻‍❄️",
    "emoji_flags_and_tones": "🇨🇳🇺🇸🇫🇷🇧🇷 🏴󠁧󠁢󠁳󠁣󠁴󠁿 👍🏻👍🏿 #️⃣ 1️⃣",
    "zero_width_and_bidi": "zero\u200bwidth\u200cnon\u200djoiner \u200eLTR\u200f \u202eRTL override\u202c \ufeffBOM",
    "math_and_symbols": "∀x∈ℝ: x²≥0 ∑ᵢ₌₁ⁿ i = n(n+1)/2 → ∞ ≠ ≈ ± × ÷ € £ ¥ ₩ © ® ™ §",
    "mixed_scripts": "GPT-4和Qwen2比较: よろしく, привет, مرحبا, שלום, नमस्ते, สวัสดี!",
    "long_word": "Donaudampfschifffahrtsgesellschaftskapitänswitwe pneumonoultramicroscopicsilicovolcanoconiosis",
    "repeated_chars": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!!!!!!! ................ 哈哈哈哈哈哈哈哈哈",
    "private_use_and_rare": "\ue000\uf8ff \U000f0000 \U0010fffd \U0001d4b3\U0001d4c3",
    "replacement_char": "already broken: \ufffd\ufffd ok",
    "control_chars": "nul\x00bell\x07esc\x1b[31mred\x1b[0m del\x7f",
    "special_tokens_inside_text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n你好<|im_end|><|endoftext|>",
    "special_tokens_glued": "x<|im_end|>y<|im_start|><|im_start|>z<|endoftext|>\u0301",
    "added_tokens_non_special": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "special_token_lookalikes": "<|im_end| <im_end|> <|IM_END|> <| im_end |> <<|im_end|>> <|fim_prefix|>",
}

CORPUS: dict[str, str] = {**LANGUAGES, **CODE, **EDGE_CASES}


def multilingual_text(n_bytes: int = 10_240) -> str:
    """About ``n_bytes`` of UTF-8 from the corpus (languages and code, cycled), cut at a
    character boundary: the text of ``benchmarks/bpe_speed.py``."""
    pieces = [*LANGUAGES.values(), *CODE.values()]
    text, i = "", 0
    while len(text.encode("utf-8")) < n_bytes:
        text += pieces[i % len(pieces)] + "\n"
        i += 1
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 331) -> Path:
    """Train a tiny Qwen2-style tokenizer on the corpus and write it as a model directory.

    The pipeline is Qwen2's (NFC, its regex, byte-level), the vocabulary is 256 bytes + 3
    special tokens + 72 merges, and two non-special added tokens follow, so ids, merges and
    sizes all differ from the real model's: a test that passes here and there is not
    passing by coincidence. With so few merges most characters stay split into bytes,
    which is what the streaming detokenizer must survive. ``tokenizer_config.json`` names
    HF's ``Qwen2Tokenizer`` class, so ``AutoTokenizer`` is a valid reference on it.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([*CORPUS.values()] * 3, trainer)
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir
