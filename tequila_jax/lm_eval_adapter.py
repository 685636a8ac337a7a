"""lm-eval harness adapter: any lm-eval task on tequila_jax checkpoints.

lm-eval has no plugin discovery, so run it through this module, which
registers the model name `tequila_jax` and then hands its arguments to
lm-eval's own command line:

    python -m tequila_jax.lm_eval_adapter --model tequila_jax \
        --model_args checkpoint=runs/llama1b_tequila,batch_size=16 \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande

`checkpoint` is anything `tequila_jax.inference.load` opens (a training
workdir, a Hugging Face directory, a .gguf file, a .tqj export). From
Python, `import tequila_jax.lm_eval_adapter` and pass `model="tequila_jax"`
to `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tequila_jax import evaluate, inference, sampling


@register_model("tequila_jax")
class TequilaLM(LM):

  def __init__(self, checkpoint: str, batch_size: int | str = 8,
               max_length: int | str | None = None, step: int | str | None = None,
               **kwargs):
    super().__init__()
    del kwargs  # lm-eval passes device and friends; XLA places the model
    self.model, self.tok = inference.load(
        checkpoint, step=int(step) if step is not None else None)
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or self.model.cfg.max_seq_len)

  def _context(self, text: str) -> list[int]:
    return self.tok.encode(text, bos=self.tok.bos_id is not None)

  def loglikelihood(self, requests):
    pairs = [(self._context(r.args[0]), self.tok.encode(r.args[1]))
             for r in requests]
    return evaluate.loglikelihoods(self.model, pairs, batch_size=self.batch_size,
                                   max_len=self.max_length, with_greedy=True)

  def loglikelihood_rolling(self, requests):
    out = []
    for r in requests:
      ids = self.tok.encode(r.args[0], bos=self.tok.bos_id is not None)
      pairs = [(ids[max(0, s - self.max_length):s], ids[s:s + self.max_length])
               for s in range(1, len(ids), self.max_length)]
      out.append(sum(evaluate.loglikelihoods(
          self.model, pairs, batch_size=self.batch_size,
          max_len=self.max_length)))
    return out

  def generate_until(self, requests):
    out = []
    for r in requests:
      context, kwargs = r.args
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))

      def stop(ids, until=until):
        text = self.tok.decode(ids)
        return any(u in text for u in until)

      ids = list(sampling.generate(self.model, self._context(context),
                                   max_new_tokens=max_new, stop=stop,
                                   eos_id=self.tok.eos_id))
      text = self.tok.decode(ids)
      for u in until:
        text = text.split(u)[0]
      out.append(text)
    return out


def main():
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  cli_evaluate()


if __name__ == "__main__":
  main()
