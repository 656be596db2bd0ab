"""`qlora-train generate`: text from a finished run's model (the 4-bit base with its trained adapters), to see what
training did. The model is rebuilt as the run built it (rebuild.py); on the CPU, generation's one-row steps take
linear_4bit's decode-sized path (W decoded in registers)."""
from __future__ import annotations


import torch

from .config import ConfigError
from .flags import Parser
from .rebuild import CHECKPOINT_HELP, rebuild_run


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 60,
                  temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, chat: bool = False) -> str:
    """prompt followed by up to max_new_tokens generated tokens (greedy when temperature is 0; else sampled with
    torch's generator seeded by seed, so the same call gives the same text). chat: the prompt is a user message
    rendered by the tokenizer's chat template with the assistant's generation prompt, and the reply alone is
    returned (what a model trained on {"messages"} data answers), ending at the template's end-of-turn mark."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()   # no dropout
    try:
        return _generate(model, tokenizer, prompt, max_new_tokens, temperature, top_p, seed, device, chat)
    finally:
        model.train(was_training)


@torch.no_grad()
def _generate(model, tokenizer, prompt, max_new_tokens, temperature, top_p, seed, device, chat) -> str:
    from .trainer import autocast_for

    stop = None
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat needs a tokenizer with a chat template, and this model's has none (train "
                              "with --chat-template to give the run one)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        stop = end_of_turn(tokenizer)
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty after tokenization: give some text to continue")
    sample = temperature > 0
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    if stop:   # (also where it is the EOS: the model's generation config may not stop there)
        from transformers import StoppingCriteriaList
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopAtText(tokenizer, ids.shape[1], stop)])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with autocast_for(device):
            out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                                 use_cache=True, **kwargs)
    if not chat:
        return tokenizer.decode(out[0], skip_special_tokens=True)
    new = out[0, ids.shape[1]:].tolist()
    ended = False
    if stop:   # the reply is the tokens before the one that completes the mark, and the text before the mark
        end = next((k for k in range(1, len(new) + 1) if stop in tokenizer.decode(new[:k])), None)
        ended, new = end is not None, new[:end]
    reply = tokenizer.decode(new, skip_special_tokens=True)
    # a reply that ended at the mark is cut there, with the whitespace before it (the template's, not the reply's)
    return reply.split(stop)[0].rstrip() if ended else reply


class StopAtText:
    """A transformers stopping criterion: done once the text generated after `start` holds `mark` (decoded, so a
    mark spelled out of several tokens is seen too; transformers' stop_strings needs a tokenizer whose vocabulary
    it can map to text, which not every one allows). A reply is short: decoding it at each step is cheap."""

    def __init__(self, tokenizer, start: int, mark: str):
        self.tokenizer, self.start, self.mark = tokenizer, start, mark

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = [self.mark in self.tokenizer.decode(row[self.start:]) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def end_of_turn(tokenizer) -> str:
    """What ends a reply: the mark the chat template writes after an assistant message's content (ChatML's
    "<|im_end|>", Llama 3's "<|eot_id|>", "### End" whole), up to an EOS glued to it. Where the template ends
    a turn with whitespace alone ("User: ...\n\nAssistant: ...\n\n"), the next user turn's header ("User:"):
    the model starting that turn has finished its reply. "" where neither is known."""
    sentinel, question = "\u2063qlora-reply\u2063", "\u2063qlora-question\u2063"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    after = _rendered_between(tokenizer, turns, sentinel, None).strip()
    if not after:   # the next turn's header, from a conversation going on
        after = _rendered_between(tokenizer, turns + [{"role": "user", "content": question}], sentinel,
                                  question).strip()
    if not after:
        return ""
    # a token of the tokenizer's own that starts it ("<|eot_id|>"), else the text, up to an EOS glued to it
    special = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "get_added_vocab", dict)()),
                     key=len, reverse=True)
    first = next((t for t in special if t and after.startswith(t)), None)
    if first is not None:
        return first
    eos = tokenizer.eos_token
    return after[:after.index(eos, 1)].rstrip() if eos and eos in after[1:] else after


def _rendered_between(tokenizer, conversation, start: str, end) -> str:
    """The template's rendering of conversation between the texts start and end (end None: to the end); "" where
    the template refuses the conversation or does not show them."""
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:   # a template that refuses such a conversation: no mark known
        return ""
    if start not in text:
        return ""
    rest = text.split(start)[-1]
    return rest.split(end)[0] if end is not None and end in rest else ("" if end is not None else rest)


def main(argv=None) -> int:
    p = Parser(prog="qlora-train generate", description=__doc__)
    p.add_argument("--output-dir", required=True, help="the run's folder (as given to qlora-train)")
    p.add_argument("--prompt", default="To be, or not to be", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=60, help="at most this many tokens (default 60)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed: the same seed, the same text (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template and print the "
                        "reply (for a model trained on chat data)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: the CPU, or the GPU for a LoftQ run that trained on one)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be positive, --temperature >= 0 and --top-p in (0, 1]")
    run = rebuild_run(args.output_dir, args.device, log=lambda s: None, checkpoint=args.checkpoint)
    print(generate_text(run.model, run.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                        args.seed, args.chat))
    return 0
