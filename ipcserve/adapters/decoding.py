"""Batched decoding for a causal LM: many sequences, one forward pass per step.

A :class:`Generation` is one request: its prompt ids, its sampling settings and its ``n``
sequences (choices). :meth:`BatchDecoder.step` advances a list of generations by one step:

* a generation whose prompt is not prefilled yet runs its next **prefill chunk** alone (a
  batch of one), ``prefill_chunk`` tokens at most, at boundaries fixed from the prompt's
  start; chunks of several generations run in one step while their tokens fit in
  ``prefill_chunk`` (at least one chunk per step), so a long prompt never stalls the others
  for more than one chunk. Its last chunk's logits give every choice its first token;
* every choice already prefilled is a **row of one batched forward pass**: its last token
  in, its next token out. The rows' key/value caches are one transformers ``DynamicCache``,
  left-padded to a common length; an attention mask hides the padding and each row gets its
  own position ids, so a row computes what it would alone. Rows join (a new generation, or
  one that was paused) by padding and concatenating, and leave (finished, cancelled,
  paused) by ``batch_select_indices``; columns that are padding in every row are cut.

The ``n`` choices of a generation share its prefill: each starts from the prompt's cache
(copied into its row when it joins the batch). Each choice samples with its own
``torch.Generator`` (seeded with ``seed + index``), so a seeded request gives the same tokens
alone or batched with any others.

A request with several prompts (``prompts``) is a :class:`Group` of generations, one per
prompt, stepped as one state; choice ``i`` of prompt ``p`` is the request's choice
``p * n + i``. With ``logprobs``, every token item carries the token's log-probability
under the model's raw distribution (and the likeliest alternatives); with ``echo``, each
choice starts with an item holding the prompt (and its tokens' log-probabilities, from the
prefill's logits).

A step that raises (or is interrupted) leaves no batch behind: the batch is taken out before
the forward pass and put back after, so the caller ends every generation of that step and
the next step starts from the rows still held by generations outside it.

Everything heavy (torch, transformers) is imported inside functions.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..engine.runtime import Made
from .generation import (
    MIN_TEMPERATURE,
    IncrementalDecoder,
    Prompt,
    Sampling,
    StopBuffer,
    pick,
    prepare,
    prompt_ids,
)
from .grammar import Grammars, Matcher

__all__ = ["BatchDecoder", "Choice", "Generation", "Group", "TextGenerator"]


# Tokens before a token that its text is decoded after (see BatchDecoder._texts).
_CONTEXT = 4


class Choice:
    """One generated sequence of a generation (OpenAI's ``choices[index]``)."""

    __slots__ = ("generation", "index", "generator", "decoder", "stops", "produced", "room",
                 "done", "token", "length", "kv", "matcher")

    def __init__(self, generation: Generation, index: int, room: int, tokenizer: Any,
                 device: str) -> None:
        import torch

        ids, sampling = generation.ids, generation.sampling
        self.generation = generation
        self.index = index
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(sampling.seed + index if sampling.seed is not None
                                   else secrets.randbits(63))
        self.decoder = IncrementalDecoder(tokenizer, ids)
        self.stops = StopBuffer(sampling.stop)
        self.produced = 0
        self.room = room
        self.done = False
        self.token = -1  # the last token made: the next step's input
        self.length = 0  # tokens in its cache (without padding)
        # Its key/value states while it is outside the batch: (keys, values) per layer,
        # each [1, heads, length, head_dim]; None while it is a row of the batch.
        self.kv: list[tuple[Any, Any]] | None = None
        self.matcher: Matcher | None = None  # its place in the answer's grammar, if any


class Generation:
    """One request's state: its prompt, its prefill progress and its choices.

    Attributes:
        rows: the batch rows it takes (its choices not finished yet).
    """

    __slots__ = ("ids", "sampling", "n", "position", "cache", "choices", "ended", "text",
                 "offset", "indexed", "prompt_logprobs", "grammar")

    def __init__(self, ids: list[int], sampling: Sampling, text: str = "", offset: int = 0,
                 indexed: bool | None = None, grammar: str | None = None) -> None:
        self.ids = ids
        self.grammar = grammar  # compiled from sampling.json_schema
        self.sampling = sampling
        self.n = sampling.n
        self.text = text  # the prompt's text, for echo
        self.offset = offset  # its first choice's index in the request
        self.indexed = sampling.n > 1 if indexed is None else indexed  # items carry "index"
        # echo with logprobs: one entry per prompt token (the first without a logprob)
        self.prompt_logprobs: list[dict[str, Any]] = []
        self.position = 0  # prompt tokens prefilled so far
        self.cache: Any = None  # the prompt's DynamicCache while it is prefilled
        self.choices: list[Choice] = []
        self.ended = False

    @property
    def prefilled(self) -> bool:
        return self.position >= len(self.ids)

    @property
    def rows(self) -> int:
        if not self.choices:
            return self.n
        return sum(1 for c in self.choices if not c.done)

    @property
    def done(self) -> bool:
        return self.ended or (bool(self.choices) and all(c.done for c in self.choices))


class Group:
    """The generations of a request with several prompts, stepped as one state."""

    __slots__ = ("generations",)

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.generations if not g.done)


def _flat(states: Sequence[Generation | Group]) -> list[Generation]:
    return [g for s in states for g in (s.generations if isinstance(s, Group) else [s])]


def _merged(states: Sequence[Generation | Group], made: list[Made]) -> list[Made]:
    """Each state's figures from its generations' (in :func:`_flat`'s order)."""
    out, at = [], 0
    for state in states:
        count = len(state.generations) if isinstance(state, Group) else 1
        parts, at = made[at:at + count], at + count
        out.append(parts[0] if count == 1 else Made(
            [item for m in parts for item in m.items], all(m.done for m in parts),
            sum(m.tokens for m in parts)))
    return out


class BatchDecoder:
    """Steps generations of one causal LM; made in the ML process.

    Args:
        model: a transformers ``...ForCausalLM`` in eval mode.
        tokenizer: its tokenizer.
        device: where the model is.
        context: most tokens of prompt plus completion.
        end_ids: tokens that end a sequence.
        cache_name: the forward's key/value cache argument (``cache`` or
            ``past_key_values``).
        prefill_chunk: most prompt tokens per forward pass, and per step.
    """

    def __init__(self, model: Any, tokenizer: Any, device: str, context: int,
                 end_ids: frozenset[int], cache_name: str, prefill_chunk: int,
                 grammars: Grammars | None = None) -> None:
        self.model = model
        self.grammars = grammars
        self.tokenizer = tokenizer
        self.device = device
        self.context = context
        self.end_ids = end_ids
        self.cache_name = cache_name
        self.prefill_chunk = prefill_chunk
        self.rows: list[Choice] = []  # the batch's rows, in order
        self.cache: Any = None  # their DynamicCache, left-padded to self.width
        self.width = 0
        self.texts: dict[int, str] = {}  # token id -> its text, for logprobs

    # -- the hook --------------------------------------------------------------------
    def start(self, ids: list[int], sampling: Sampling, text: str = "", offset: int = 0,
              indexed: bool | None = None, grammar: str | None = None) -> Generation:
        """A generation of ``sampling.n`` choices for prompt ``ids`` (checked by the
        caller); ``text`` is the prompt for ``echo``, ``offset`` its first choice's index in
        the request, ``indexed`` whether items carry it (default: ``n`` > 1) and
        ``grammar`` what every answer follows (:meth:`.grammar.Grammars.compile`)."""
        return Generation(ids, sampling, text, offset, indexed, grammar)

    def step(self, generations: Sequence[Generation]) -> list[Made]:
        """One step of every generation in ``generations``: see the module docstring."""
        import torch

        made = [Made([], False, 0) for _ in generations]
        with torch.inference_mode():
            rows = [(g, c) for g, m in zip(generations, made) if g.prefilled and not g.done
                    for c in g.choices if not c.done]
            if rows or self.rows:
                self._sync([c for _, c in rows])
            if self.rows:
                by_generation = {id(g): m for g, m in zip(generations, made)}
                self._decode({id(c): by_generation[id(g)] for g, c in rows})
            waiting = [(g, m) for g, m in zip(generations, made)
                       if not g.prefilled and not g.done]
            # Whole prompts that fit in one chunk share one padded forward pass: on a CPU a
            # prefill of several prompts costs less per prompt than each alone.
            whole, used = [], 0
            for g, m in waiting:
                if g.position == 0 and used + len(g.ids) <= self.prefill_chunk:
                    whole.append((g, m))
                    used += len(g.ids)
            if len(whole) > 1:
                self._prefill_together(whole)
                waiting = [w for w in waiting if w not in whole]
            budget = self.prefill_chunk - (used if len(whole) > 1 else 0)
            for g, m in waiting:
                if budget <= 0:
                    break
                budget -= self._prefill(g, m)
        for g, m in zip(generations, made):
            m.done = g.done
        return made

    def finish(self, generation: Generation) -> None:
        """Forget ``generation``: its rows leave the batch at the next step (at once when
        no other row is left, so an idle model holds no cache)."""
        generation.ended = True
        generation.cache = None
        for choice in generation.choices:
            choice.done = True
            choice.kv = None
        if all(c.done for c in self.rows):
            self.rows, self.cache, self.width = [], None, 0

    # -- prefill ---------------------------------------------------------------------
    def _prefill(self, g: Generation, made: Made) -> int:
        """The generation's next prompt chunk; its first tokens when the prompt is done.
        Returns the chunk's length."""
        import torch
        from transformers import DynamicCache

        start = g.position
        end = min(len(g.ids), (start // self.prefill_chunk + 1) * self.prefill_chunk)
        if g.cache is None:
            g.cache = DynamicCache()
        inputs = torch.tensor([g.ids[start:end]], device=self.device)
        out = self.model(input_ids=inputs, use_cache=True, **{self.cache_name: g.cache})
        g.cache = getattr(out, self.cache_name)
        g.position = end
        if g.sampling.echo and g.sampling.logprobs is not None:
            self._prompt_logprobs(g, out.logits[0], start)
        if g.prefilled:
            kv = [(layer.keys, layer.values) for layer in g.cache.layers]
            g.cache = None
            self._first_tokens(g, kv, out.logits[0, -1], made)
        return end - start

    def _prefill_together(self, batch: list[tuple[Generation, Made]]) -> None:
        """Whole prompts in one forward pass, left-padded, each row masked and positioned
        as if alone; each generation keeps its own rows of the cache."""
        import torch
        from transformers import DynamicCache

        width = max(len(g.ids) for g, _ in batch)
        pad = [width - len(g.ids) for g, _ in batch]
        inputs = torch.tensor([[g.ids[0]] * p + g.ids for (g, _), p in zip(batch, pad)],
                              device=self.device)
        columns = torch.arange(width, device=self.device)
        starts = torch.tensor(pad, device=self.device)[:, None]
        mask = (columns[None, :] >= starts).long()
        positions = (columns[None, :] - starts).clamp(min=0)
        out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self.cache_name: DynamicCache()})
        cache = getattr(out, self.cache_name)
        for b, ((g, made), p) in enumerate(zip(batch, pad)):
            g.position = len(g.ids)
            if g.sampling.echo and g.sampling.logprobs is not None:
                self._prompt_logprobs(g, out.logits[b, p:], 0)
            kv = [(layer.keys[b:b + 1, :, p:], layer.values[b:b + 1, :, p:])
                  for layer in cache.layers]
            self._first_tokens(g, kv, out.logits[b, -1], made)

    def _prompt_logprobs(self, g: Generation, logits: Any, start: int) -> None:
        """Log-probabilities of the prompt tokens after ``start`` from the logits of
        positions ``start``... (position j predicts token j + 1)."""
        import torch

        if start == 0:
            g.prompt_logprobs.append({"id": g.ids[0], "token": self._text(g.ids[0]),
                                      "logprob": None, "top": None})
        count = min(len(logits), len(g.ids) - 1 - start)
        if count <= 0:
            return
        rows = torch.log_softmax(logits[:count].float(), dim=-1)
        for j in range(count):
            at = start + j + 1
            g.prompt_logprobs.append(self._entry(rows[j], g.ids[at], g.sampling.logprobs or 0,
                                                 g.ids[max(0, at - _CONTEXT):at]))

    def _first_tokens(self, g: Generation, kv: list[tuple[Any, Any]], logits: Any,
                      made: Made) -> None:
        """The prompt is in: each choice's first token, and its start in the prompt's
        states (shared by the choices; copied into a row when each joins the batch)."""
        import torch

        sampling = g.sampling
        room = min(sampling.max_tokens, self.context - len(g.ids))
        row = (torch.log_softmax(logits.float(), dim=-1) if sampling.logprobs is not None
               else None)
        for index in range(g.n):
            choice = Choice(g, index, room, self.tokenizer, self.device)
            choice.kv, choice.length = kv, len(g.ids)
            if g.grammar is not None and self.grammars is not None:
                choice.matcher = self.grammars.matcher(g.grammar)
            g.choices.append(choice)
            head = self._head(choice)
            if sampling.echo:
                item = {**head, "text": g.text}
                if sampling.logprobs is not None:
                    item["logprobs"] = g.prompt_logprobs
                if sampling.continuous_usage:
                    item["usage"] = {"prompt_tokens": len(g.ids), "completion_tokens": 0}
                made.items.append(item)
            if room <= 0:  # max_tokens 0: the prompt alone
                choice.done, choice.kv = True, None
                made.items.append({**head, "text": "", "finish_reason": "length", "usage": {
                    "prompt_tokens": len(g.ids), "completion_tokens": 0}})
                continue
            token = self._pick(choice, logits)
            self._emit(choice, token, made,
                       None if row is None else self._entry(row, token, sampling.logprobs or 0,
                                                           g.ids[-_CONTEXT:]))

    # -- the batch -------------------------------------------------------------------
    def _sync(self, wanted: list[Choice]) -> None:
        """Make the batch hold exactly the rows of ``wanted`` (in any order)."""
        import torch
        from transformers import DynamicCache

        want = {id(c) for c in wanted}
        if [id(c) for c in self.rows] == [id(c) for c in wanted]:
            return
        keep = []
        for i, c in enumerate(self.rows):
            if id(c) in want:
                keep.append(i)
            elif not c.done:  # paused (its reader is slow): it keeps its own states
                pad = self.width - c.length
                c.kv = [(layer.keys[i:i + 1, :, pad:].clone(), layer.values[i:i + 1, :, pad:].clone())
                        for layer in self.cache.layers]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if keep:
                self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
            else:
                self.cache, self.width = None, 0
        held = {id(c) for c in self.rows}
        joining = [c for c in wanted if id(c) not in held]
        if joining:
            width = max([self.width] + [c.length for c in joining])
            layers = []
            count = len(joining[0].kv or ())
            for layer in range(count):
                keys, values = [], []
                if self.cache is not None:
                    old = self.cache.layers[layer]
                    keys.append(_left_pad(old.keys, width - self.width))
                    values.append(_left_pad(old.values, width - self.width))
                for c in joining:
                    assert c.kv is not None
                    k, v = c.kv[layer]
                    keys.append(_left_pad(k, width - c.length))
                    values.append(_left_pad(v, width - c.length))
                layers.append((torch.cat(keys), torch.cat(values)))
            self.cache = DynamicCache(layers)
            self.width = width
            for c in joining:
                c.kv = None
            self.rows = self.rows + joining
        if not self.rows:
            return
        # Columns that are padding in every row (their longest row left): cut them.
        cut = min(self.width - c.length for c in self.rows)
        if cut > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self.width -= cut

    def _decode(self, made_by_choice: dict[int, Made]) -> None:
        """One forward pass of every row; each row's next token."""
        import torch

        rows, cache, width = self.rows, self.cache, self.width
        # Taken out while the model runs: a step that raises leaves no half-updated batch.
        self.rows, self.cache, self.width = [], None, 0
        lengths = torch.tensor([c.length for c in rows], device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        inputs = torch.tensor([[c.token] for c in rows], device=self.device)
        out = self.model(input_ids=inputs, attention_mask=mask, position_ids=lengths[:, None],
                         use_cache=True, **{self.cache_name: cache})
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one call for the greedy rows
        self.rows, self.cache, self.width = rows, getattr(out, self.cache_name), width + 1
        scored = [b for b, c in enumerate(rows) if c.generation.sampling.logprobs is not None]
        table = (dict(zip(scored, torch.log_softmax(logits[scored].float(), dim=-1)))
                 if scored else {})
        for b, c in enumerate(rows):
            c.length += 1
            sampling = c.generation.sampling
            token = (greedy[b] if sampling.temperature < MIN_TEMPERATURE and c.matcher is None
                     else self._pick(c, logits[b]))
            self._emit(c, token, made_by_choice[id(c)],
                       self._entry(table[b], token, sampling.logprobs or 0,
                                   c.decoder.ids[-_CONTEXT:]) if b in table
                       else None)

    @staticmethod
    def _pick(c: Choice, logits: Any) -> int:
        """Choice ``c``'s next token from its logits row: greedy or sampled, among the
        tokens its grammar allows (if it has one)."""
        if c.matcher is not None:
            logits = c.matcher.masked(logits)
        return pick(logits, c.generation.sampling, c.generator)

    # -- items -----------------------------------------------------------------------
    def _text(self, token: int) -> str:
        """One token's own text (special tokens as they are written), for logprobs."""
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = str(self.tokenizer.decode([token]))
        return text

    def _entry(self, row: Any, token: int, top: int, context: list[int]) -> dict[str, Any]:
        """``token``'s log-probability in ``row`` (a log-softmax) and the ``top`` likeliest,
        each with its text after ``context`` (the tokens before it)."""
        import torch

        ids = [int(token)]
        values: list[float] = [float(row[token])]
        if top:
            best = torch.topk(row, top)
            ids += best.indices.tolist()
            values += best.values.tolist()
        texts = self._texts(context, ids)
        return {"id": ids[0], "token": texts[0], "logprob": values[0],
                "top": [[i, t, v] for i, t, v in zip(ids[1:], texts[1:], values[1:])]}

    def _texts(self, context: list[int], tokens: list[int]) -> list[str]:
        """Each token's text where it stands, after ``context``: what it adds to the decoded
        context (a word's leading space included, as the whole text has it); its own text
        where the context does not decode to a prefix (a character split over tokens)."""
        if not context:
            return [self._text(t) for t in tokens]
        base = str(self.tokenizer.decode(context))
        wholes = self.tokenizer.batch_decode([context + [t] for t in tokens])
        return [str(w)[len(base):] if str(w).startswith(base) and len(w) > len(base)
                else self._text(t) for w, t in zip(wholes, tokens)]

    @staticmethod
    def _head(c: Choice) -> dict[str, Any]:
        g = c.generation
        return {"index": g.offset + c.index} if g.indexed else {}

    def _emit(self, c: Choice, token: int, made: Made, entry: dict[str, Any] | None = None
              ) -> None:
        """The items of ``token`` for choice ``c``: its text (with ``entry``, its
        log-probabilities, when asked for) and, at its end, its final item. With several
        choices every item carries the choice's ``index``."""
        c.produced += 1
        c.token = token
        made.tokens += 1
        sampling = c.generation.sampling
        complete = c.matcher is not None and c.matcher.advance(token)  # the answer's grammar
        if token in self.end_ids and (not sampling.ignore_eos or complete):
            text, stopped = c.stops.push(c.decoder.flush())
            text = text if stopped else text + c.stops.flush()
            finish = "stop"
        else:
            text, stopped = c.stops.push(c.decoder.add(token))
            if not stopped and (c.produced >= c.room or complete):
                tail, stopped = c.stops.push(c.decoder.flush())
                text += tail if stopped else tail + c.stops.flush()
            finish = ("stop" if stopped or complete else "length" if c.produced >= c.room
                      else "")
        head = self._head(c)
        item = {**head, "text": text}
        if entry is not None:
            item["logprobs"] = [entry]
        if sampling.continuous_usage:
            item["usage"] = {"prompt_tokens": len(c.generation.ids),
                             "completion_tokens": c.produced}
        made.items.append(item)
        if finish:
            c.done = True
            c.kv = None
            made.items.append({**head, "text": "", "finish_reason": finish, "usage": {
                "prompt_tokens": len(c.generation.ids), "completion_tokens": c.produced}})


def _left_pad(tensor: Any, columns: int) -> Any:
    """``tensor`` [batch, heads, length, dim] with ``columns`` zero columns before."""
    if columns <= 0:
        return tensor
    import torch

    pad = tensor.new_zeros((*tensor.shape[:2], columns, tensor.shape[3]))
    return torch.cat([pad, tensor], dim=2)


class TextGenerator:
    """Text generation from a causal LM; made in the ML process.

    Two ways to run a request, one token loop (:class:`BatchDecoder`):

    * the step hook (:meth:`start`, :meth:`step`, :meth:`finish`): the ML process's step
      scheduler (:mod:`ipcserve.engine.stepping`) runs every active generation of the model
      as one batch, one step per turn;
    * :meth:`stream`: a generator of one request's items, a batch of its own (in-process
      use, and models whose cache cannot be batched).

    Args:
        model: a transformers ``...ForCausalLM`` in eval mode on ``device``.
        tokenizer: its tokenizer (with a chat template for ``messages``).
        device: where the model is, e.g. "cpu" or "cuda:0".
        context: most tokens of prompt plus completion.
        max_tokens_limit: the largest ``max_tokens`` a request gets.
        prefill_chunk: most prompt tokens per forward pass (and per step).
    """

    def __init__(self, model: Any, tokenizer: Any, device: str, context: int,
                 max_tokens_limit: int, prefill_chunk: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context = context
        self.max_tokens_limit = max_tokens_limit
        self.prefill_chunk = prefill_chunk
        ends: set[int] = set()
        values: list[Any] = [getattr(tokenizer, "eos_token_id", None), getattr(
            getattr(model, "generation_config", None), "eos_token_id", None)]
        for value in values:
            ends.update([value] if isinstance(value, int) else value or ())
        self.end_ids = frozenset(ends)  # chat models often end on several (Llama 3: eot too)
        # The key-value cache's argument and output field: ``cache`` in recent transformers
        # (which warns about the old name), ``past_key_values`` before.
        forward = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in forward else "past_key_values"
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        rows = getattr(getattr(head, "weight", None), "shape", (0,))[0]
        self.grammars = Grammars(tokenizer, int(rows) or len(tokenizer))
        self.batch = self.decoder()

    def decoder(self) -> BatchDecoder:
        """A new :class:`BatchDecoder` over this model."""
        return BatchDecoder(self.model, self.tokenizer, self.device, self.context,
                            self.end_ids, self.cache_name, self.prefill_chunk, self.grammars)

    @property
    def batchable(self) -> bool:
        """Whether rows of this model's cache can join and leave one batch: every layer is
        a plain ``DynamicLayer`` (full attention). Sliding-window and recurrent layers keep
        one generator per request."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # a config transformers cannot map to cache layers
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    # -- the step hook ---------------------------------------------------------------
    def start(self, fields: Mapping[str, Any]) -> Generation | Group:
        """Check and tokenize a request; its tokens come from :meth:`step`.

        Raises:
            InputError: see :func:`read_request`; also a prompt that leaves no room in the
                context, or ``messages`` for a model without a chat template.
        """
        prompts, sampling = prepare(self.tokenizer, fields, self.context, self.max_tokens_limit)
        indexed = len(prompts) * sampling.n > 1
        grammar = (None if sampling.json_schema is None
                   else self.grammars.compile(sampling.json_schema))
        generations = [self.batch.start(ids, sampling, text, i * sampling.n, indexed, grammar)
                       for i, (ids, text) in enumerate(prompts)]
        return generations[0] if len(generations) == 1 else Group(generations)

    def step(self, states: Sequence[Generation | Group]) -> list[Made]:
        """One step of ``states`` in one batch (see :class:`BatchDecoder`)."""
        return _merged(states, self.batch.step(_flat(states)))

    def finish(self, state: Generation | Group) -> None:
        """``state`` ended (done, cancelled, failed): its rows leave the batch."""
        for generation in _flat([state]):
            self.batch.finish(generation)

    # -- one generator per request -----------------------------------------------------
    def stream(self, fields: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Check and tokenize the request now; its items come from the returned generator,
        one step per ``next()`` (the items of a step one by one).

        Raises:
            InputError: as :meth:`start`.
        """
        return self._drive(self.start(fields))

    def _drive(self, state: Generation | Group) -> Iterator[dict[str, Any]]:
        decoder = self.decoder()  # a batch of its own: another stream never joins it
        generations = _flat([state])
        try:
            while True:
                made = _merged([state], decoder.step(generations))[0]
                yield from made.items
                if made.done:
                    return
        finally:
            for generation in generations:
                decoder.finish(generation)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt (see :func:`.generation.prompt_ids`).

        Raises:
            InputError: ``messages`` the template rejects or cannot render, or no template.
        """
        return prompt_ids(self.tokenizer, prompt)
