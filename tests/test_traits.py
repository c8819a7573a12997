from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from persona_lens.traits import (
    COHERENCE_PROMPT,
    TRAITS_DIR,
    InstructionPair,
    Trait,
    TraitError,
    generate_trait,
    list_traits,
    load_spectrum,
    load_trait,
)

SHIPPED = [
    "apathetic",
    "evil",
    "hallucinating",
    "humorous",
    "impolite",
    "optimistic",
    "sycophantic",
]


def make_trait(**kw) -> Trait:
    d = dict(
        name="testy",
        description="a test trait",
        pairs=[InstructionPair("Be testy.", "Be calm.")],
        extract_questions=["q1?", "q2?"],
        eval_questions=["q3?", "q4?"],
        eval_prompt="Q: {question}\nA: {answer}\nScore 0-100 or REFUSAL.",
        assistant_names=("testy", "calm"),
    )
    d.update(kw)
    return Trait(**d)


# --- shipped artifacts ----------------------------------------------------------------------


def test_list_traits():
    assert list_traits() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_is_complete(name):
    t = load_trait(name)
    assert t.name == name and t.description
    assert len(t.pairs) == 5
    assert len(t.extract_questions) == 20 and len(t.eval_questions) == 20
    assert len(set(t.extract_questions) | set(t.eval_questions)) == 40
    for p in (t.eval_prompt, t.coherence_prompt):
        assert "{question}" in p and "{answer}" in p
        p.format(question="q", answer="a")
    assert t.assistant_names[0] == name
    for split in ("extract", "eval"):  # public format keys present in both files
        d = json.loads((TRAITS_DIR / split / f"{name}.json").read_text())
        assert {"instruction", "questions", "eval_prompt"} <= d.keys()


@pytest.mark.parametrize("name", ["evil", "sycophantic", "hallucinating"])
def test_spectrum(name):
    s = load_spectrum(name)
    assert len(s) == 8 and all(label and prompt for label, prompt in s)
    assert len({label for label, _ in s}) == 8


def test_spectrum_missing():
    with pytest.raises(TraitError, match="pass your own list"):
        load_spectrum("humorous")


def test_system_prompt():
    t = load_trait("evil")
    assert t.system_prompt("pos", 0) == f"You are an evil assistant. {t.pairs[0].pos}"
    assert t.system_prompt("neg", 2) == f"You are a helpful assistant. {t.pairs[2].neg}"
    assert load_trait("sycophantic").system_prompt("neg", 0).startswith("You are an honest ")
    with pytest.raises(ValueError):
        t.system_prompt("middle", 0)


# --- round trip and loading paths -------------------------------------------------------------


def test_round_trip(tmp_path):
    t = make_trait()
    t.save(tmp_path)
    assert (tmp_path / "extract" / "testy.json").is_file()
    for src in (tmp_path, tmp_path / "extract" / "testy.json", tmp_path / "eval" / "testy.json"):
        u = load_trait(src)
        assert u == t and u.hash == t.hash
    assert t.coherence_prompt == COHERENCE_PROMPT


def test_shipped_files_are_canonical(tmp_path):
    for name in SHIPPED:
        load_trait(name).save(tmp_path)
        for split in ("extract", "eval"):
            rel = Path(split) / f"{name}.json"
            assert (tmp_path / rel).read_text() == (TRAITS_DIR / rel).read_text()


def test_custom_coherence_round_trip(tmp_path):
    t = make_trait(coherence_prompt="Rate {question} -> {answer}")
    t.save(tmp_path)
    assert load_trait(tmp_path).coherence_prompt == "Rate {question} -> {answer}"


def test_hash_tracks_content():
    a, b = make_trait(), make_trait()
    assert a.hash == b.hash and len(a.hash) == 16
    assert make_trait(eval_questions=["q3?", "q5?"]).hash != a.hash


def test_public_format_without_extra_keys(tmp_path):
    t = make_trait()
    for split in ("extract", "eval"):
        d = t.to_json(split)
        del d["description"], d["assistant_names"]
        (tmp_path / split).mkdir()
        (tmp_path / split / "testy.json").write_text(json.dumps(d))
    u = load_trait(tmp_path / "extract" / "testy.json")
    assert u.assistant_names == ("testy", "helpful") and u.description == ""


def test_unknown_name():
    with pytest.raises(TraitError, match="generate_trait"):
        load_trait("grumpy")


# --- malformed inputs ---------------------------------------------------------------------


def write_split(folder: Path, split: str, d: dict | str) -> Path:
    p = folder / split / "testy.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    return p


def corrupt(tmp_path: Path, split: str, fn) -> Path:
    make_trait().save(tmp_path)
    p = tmp_path / split / "testy.json"
    d = json.loads(p.read_text())
    write_split(tmp_path, split, fn(d))
    return tmp_path / "extract" / "testy.json"


@pytest.mark.parametrize(
    "split,fn,fragment",
    [
        ("eval", lambda d: d.pop("questions") and d, "missing key 'questions'"),
        ("extract", lambda d: {**d, "questions": "q1?"}, "'questions' must be a list"),
        ("extract", lambda d: {**d, "instruction": [{"pos": "x"}]}, "'instruction' must be a list"),
        ("extract", lambda d: {**d, "eval_prompt": 3}, "'eval_prompt' must be a string"),
        ("extract", lambda d: {**d, "questions": ["q1?"]}, "has 1 question(s)"),
        ("eval", lambda d: {**d, "questions": ["q1?", "q9?"]}, "both contain: ['q1?']"),
        ("extract", lambda d: {**d, "assistant_names": ["x"]}, "'assistant_names' must be"),
        ("extract", lambda d: '{"instruction": [\n  oops]}', "invalid JSON at line 2"),
        ("extract", lambda d: [1, 2], "expected a JSON object"),
        (
            "eval",
            lambda d: {**d, "eval_prompt": d["eval_prompt"] + "!"},
            "disagree on 'eval_prompt'",
        ),
    ],
)
def test_malformed_file(tmp_path, split, fn, fragment):
    path = corrupt(tmp_path, split, fn)
    with pytest.raises(TraitError) as e:
        load_trait(path)
    assert fragment in str(e.value)


def test_errors_name_the_file(tmp_path):
    path = corrupt(tmp_path, "eval", lambda d: d.pop("eval_prompt") and d)
    with pytest.raises(TraitError, match=r"eval[/\\]testy\.json: missing key 'eval_prompt'"):
        load_trait(path)


def test_missing_eval_file(tmp_path):
    make_trait().save(tmp_path)
    (tmp_path / "eval" / "testy.json").unlink()
    with pytest.raises(TraitError, match="missing file"):
        load_trait(tmp_path / "extract" / "testy.json")


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(pairs=[]), "at least 1"),
        (dict(pairs=[InstructionPair("Be testy.", " ")]), "instruction[0].neg is empty"),
        (dict(extract_questions=["q1?"]), "the paper uses 20"),
        (dict(eval_questions=["q1?", "q2?"]), "disjoint"),
        (dict(eval_prompt="Q: {question}"), "missing the {answer} slot"),
        (dict(eval_prompt="A: {answer}"), "missing the {question} slot"),
        (dict(eval_prompt="{question} {answer} {score}"), "braces other than"),
        (dict(coherence_prompt="{answer}"), "'coherence_prompt' is missing the {question}"),
        (dict(assistant_names=("testy",)), "two non-empty strings"),
        (dict(assistant_names="ab"), "two non-empty strings"),
        (dict(name="bad/name"), "becomes a file name"),
    ],
)
def test_invalid_trait(kw, fragment):
    with pytest.raises(TraitError) as e:
        make_trait(**kw)
    assert fragment in str(e.value)


# --- generation against a real loopback HTTP server -----------------------------------------

GOOD = {
    "instruction": [{"pos": f"Be grumpy {i}.", "neg": f"Be cheerful {i}."} for i in range(5)],
    "questions": [f"Question number {i}?" for i in range(40)],
    "eval_prompt": "Is this grumpy?\n{question}\n{answer}\nReply 0-100 or REFUSAL.",
}


class LLMServer:
    """Loopback server speaking OpenAI chat completions and Anthropic messages; replies with
    the queued texts in order and records every request."""

    def __init__(self, replies: list[str]):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                text = outer.replies.pop(0)
                if self.path.endswith("/chat/completions"):
                    out = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                elif self.path.endswith("/v1/messages"):
                    out = {"content": [{"type": "text", "text": text}], "role": "assistant"}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    servers = []

    def start(replies):
        servers.append(LLMServer(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_generate_openai_retries_then_succeeds(llm, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    bad = json.dumps({**GOOD, "questions": GOOD["questions"][:7]})
    srv = llm(["Sure! Here is {not json", bad, "```json\n" + json.dumps(GOOD) + "\n```"])
    t = generate_trait("grumpy", "always in a bad mood", base_url=srv.url + "/v1", api_key="k")
    assert len(srv.requests) == 3
    path, headers, body = srv.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "gpt-4.1"
    # each validation error is fed back to the model
    feedback = [m["content"] for m in body["messages"] if m["role"] == "user"][1:]
    assert "not valid JSON" in feedback[0] and "7 distinct questions" in feedback[1]
    assert len(t.pairs) == 5 and t.assistant_names == ("grumpy", "helpful")
    assert t.extract_questions == GOOD["questions"][:20]
    assert t.eval_questions == GOOD["questions"][20:]


def test_generate_anthropic(llm, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "secret")
    bad = json.dumps({**GOOD, "eval_prompt": "Rate {answer}"})
    srv = llm([bad, json.dumps(GOOD)])
    t = generate_trait("grumpy", "moody", provider="anthropic", model="m", base_url=srv.url)
    path, headers, body = srv.requests[-1]
    assert path == "/v1/messages" and headers["x-api-key"] == "secret"
    assert "anthropic-version" in headers and body["model"] == "m" and body["max_tokens"] > 0
    assert "{question} slot" in body["messages"][-1]["content"]
    assert t.eval_prompt == GOOD["eval_prompt"]


def test_generate_gives_up(llm):
    srv = llm(["nope"] * 2)
    with pytest.raises(TraitError, match="no valid trait after 2 attempts"):
        generate_trait("grumpy", "moody", base_url=srv.url, api_key="k", max_retries=1)


def test_generate_env_base_url(llm, monkeypatch):
    srv = llm([json.dumps(GOOD)])
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url + "/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "envkey")
    generate_trait("grumpy", "moody")
    assert srv.requests[0][1]["Authorization"] == "Bearer envkey"


@pytest.mark.parametrize(
    "provider,env", [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
def test_generate_missing_key(monkeypatch, provider, env):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(RuntimeError, match=env):
        generate_trait("grumpy", "moody", provider=provider, base_url="http://127.0.0.1:9")
