"""llama.cpp in Spec-Bench: the outside anchor that answers "why not llama.cpp?" with numbers.

llama.cpp (through the optional package llama-cpp-python) runs the GGUF file itself: its
quantised weights (the default model: Q4_1) with its own CPU kernels, where turbolm dequantises
the same file to float32 torch weights. So that both start from the same prompt, it is fed the
exact token ids every other method gets (the HF tokenizer's chat template; the GGUF's own
tokenizer must agree, checked once at load), decodes greedily (temperature 0) until EOS or
``max_new_tokens``, and each call is timed whole: llama.cpp's prefill included, with no prompt
cache kept from one call to the next (turbolm's methods keep none either).

Its outputs are not turbolm's: quantised weights can change a greedy token, so a difference from
vanilla is listed but is no losslessness failure. ``llama-cpp-prompt-lookup`` is
llama-cpp-python's own prompt-lookup decoding (``LlamaPromptLookupDecoding`` as the draft).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.errors import ParameterError, TurboLMError, literal
from ..core.generation import GenerationResult, SamplingParams, context_length

LLAMA_CPP_METHODS = ("llama-cpp", "llama-cpp-prompt-lookup")
#: draft tokens per step of llama-cpp-python's prompt lookup (its own default, and transformers')
PROMPT_LOOKUP_TOKENS = 10
#: llama.cpp allocates its KV cache (and, with prompt lookup, a logits row per position) for the
#: whole context up front: a model's 128k context would not fit, Spec-Bench's turns do in 8k
MAX_CONTEXT = 8192
#: the default ``-DGGML_NATIVE=ON`` build crashed at the first generated token on an AMX CPU
BUILD_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
INSTALL = f"CMAKE_ARGS=\"{BUILD_FLAGS}\" pip install 'turbolm[llamacpp]'"
#: a chat turn with code, digits, whitespace runs and non-ASCII text, to compare the two tokenizers on
TOKENIZER_SAMPLE = ("Write a Python function `add(a, b)` that returns a + b;  then explain 3.14 * 2 = 6.28 "
                    "in two sentences.\n\n    def f(x):\n\treturn x**2  # café, naïve, 東京, 😀")


def import_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp.llama_speculative  # noqa: F401  (prompt lookup)
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its shared library does not load
        reason = "not installed" if isinstance(e, ModuleNotFoundError) and e.name == "llama_cpp" else str(e).splitlines()[0]
        raise TurboLMError(f"the llama-cpp methods need llama-cpp-python ({reason}): install it with {INSTALL}, "
                           "a source build of a few minutes") from None
    return llama_cpp


def resolve_gguf(model, gguf: str | Path | None) -> Path:
    """The GGUF file llama.cpp runs: ``gguf`` if given, else the file the target itself was loaded from."""
    if gguf is not None:
        path = Path(gguf).expanduser()
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise ParameterError(f"{{}} {literal(gguf)}: not a .gguf file", "llama_cpp_gguf")
        return path
    source = getattr(model, "turbolm_source", None)
    if source is not None and source.kind in ("default", "gguf"):
        return source.path
    name = source.name if source is not None else type(model).__name__
    raise ParameterError(f"the llama-cpp methods run a GGUF file and the model {literal(name)} is a Hugging Face "
                         "directory: give a GGUF of the same model with {}", "llama_cpp_gguf")


def check_tokenizer(llm, tokenizer, gguf: Path) -> None:
    """Refuse a GGUF whose tokenizer turns a sample chat prompt into other ids than the HF tokenizer:
    fed the HF ids, llama.cpp would read another prompt."""
    messages = [{"role": "user", "content": TOKENIZER_SAMPLE}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = TOKENIZER_SAMPLE
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    have = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    if have != want:
        at = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
        raise ParameterError(f"the tokenizer of {literal(gguf.name)} does not match the model's (a sample prompt "
                             f"differs at token {at}: {have[at:at + 3]} vs {want[at:at + 3]}); give the GGUF of the "
                             "same model with {}", "llama_cpp_gguf")


def weight_type(llm) -> str:
    """The GGUF's quantisation (``Q4_1``, ``F16``, ...) from its ``general.file_type``, or ``unknown``."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(llm.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError, TypeError, AttributeError):
        return "unknown"


class LlamaCppDecoder:
    """One llama.cpp model, decoding the benchmark's prompts as ``generate(ids, max_new_tokens, sampling)``.

    ``prompt_lookup_tokens``: None for plain decoding, else llama-cpp-python's prompt lookup with
    that many draft tokens per step. ``eos``: the token ids that end an answer (kept in it, as
    vanilla keeps them). ``threads`` (default: torch's) serves the prefill and the decoding alike.
    """

    def __init__(self, gguf: Path, tokenizer, eos: set[int], *, n_ctx: int, prompt_lookup_tokens: int | None = None,
                 threads: int | None = None, n_batch: int = 512, seed: int = 0):
        llama_cpp = import_llama_cpp()
        draft = None
        if prompt_lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup_tokens)
        threads = threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                # llama-cpp-python sizes its logits buffer from this flag but fills a row per drafted
                # position: prompt lookup needs it on (its draft path turns it on for the decoding only)
                logits_all=draft is not None, verbose=False, seed=seed, draft_model=draft)
        except (ValueError, RuntimeError, OSError) as e:
            raise TurboLMError(f"llama.cpp cannot load {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        check_tokenizer(self.llm, tokenizer, gguf)
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.n_ctx = n_ctx
        self.info = {"gguf": str(gguf), "weights": weight_type(self.llm), "threads": threads, "n_ctx": n_ctx,
                     "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
                     "prompt_lookup_tokens": prompt_lookup_tokens}
        # The committed length before each of llama.cpp's forwards (``Llama.eval`` calls): forwards
        # give tau, and the growth between two of them is what the earlier one committed.
        self._starts: list[int] = []
        evaluate = self.llm.eval

        def counted_eval(tokens):
            self._starts.append(self.llm.n_tokens)
            return evaluate(tokens)

        self.llm.eval = counted_eval

    def generate(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> GenerationResult:
        if not ids:
            raise TurboLMError("empty prompt: it encodes to zero tokens")
        if len(ids) >= self.n_ctx:
            raise TurboLMError(f"the prompt has {len(ids)} tokens but llama.cpp's context is {self.n_ctx} tokens")
        budget = min(max_new_tokens, self.n_ctx - len(ids))
        if sampling.greedy:
            settings = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0}
        else:
            settings = {"temp": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": 0.0}
            if sampling.seed is not None:
                self.llm.set_seed(sampling.seed)
        self.llm.reset()  # a full prefill every call: no prefix of an earlier prompt is reused
        self._starts.clear()
        new: list[int] = []
        finish = "length"
        prefill_seconds = float("nan")
        start = time.perf_counter()
        for token in self.llm.generate(list(ids), repeat_penalty=1.0, reset=True, **settings):
            if not new:
                prefill_seconds = time.perf_counter() - start
            new.append(int(token))
            if new[-1] in self.eos:
                finish = "eos"
                break
            if len(new) >= budget:
                break  # before the generator resumes: no forward beyond the last token
        seconds = time.perf_counter() - start
        forwards = len(self._starts)
        starts = self._starts[1:]
        steps: dict[int, int] = {}
        for a, b in zip(starts, starts[1:] + [len(ids) + len(new) - 1]):
            steps[b - a] = steps.get(b - a, 0) + 1
        method = "llama-cpp-prompt-lookup" if self.info["prompt_lookup_tokens"] else "llama-cpp"
        return GenerationResult(
            token_ids=new, text=self.tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=len(ids),
            finish_reason=finish, target_forwards=forwards, seconds=seconds, prefill_seconds=prefill_seconds,
            stats={"method": method, "tokens_per_step_histogram": {str(k): steps[k] for k in sorted(steps)}},
        )


def build_llama_cpp(name: str, model, tokenizer, eos: set[int], gguf: str | Path | None = None,
                    seed: int = 0) -> LlamaCppDecoder:
    """The decoder of method ``name`` (one of ``LLAMA_CPP_METHODS``) for the target ``model``."""
    if name not in LLAMA_CPP_METHODS:
        raise ParameterError(f"unknown llama.cpp method '{name}' in {{}}: use {' or '.join(LLAMA_CPP_METHODS)}", "methods")
    path = resolve_gguf(model, gguf)
    n_ctx = min(context_length(model, tokenizer) or MAX_CONTEXT, MAX_CONTEXT)
    lookup = PROMPT_LOOKUP_TOKENS if name == "llama-cpp-prompt-lookup" else None
    return LlamaCppDecoder(path, tokenizer, eos, n_ctx=n_ctx, prompt_lookup_tokens=lookup, seed=seed)
