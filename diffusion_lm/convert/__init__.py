"""Hugging Face checkpoint folders in and out: a local folder <-> an ordinary workdir.

  python -m diffusion_lm.convert --from_hf=path/to/LLaDA-8B-Base --workdir=runs/llada [--max_len=4096]
  python -m diffusion_lm.convert --to_hf=exported/ --workdir=runs/demo

Import reads config.json, the safetensors (one file, or shards listed by model.safetensors.index.json)
and tokenizer.json of a folder the user has (nothing is downloaded), and writes a workdir (orbax
checkpoint at step 0, config, tokenizer) that sample, evaluate, bench and fine-tuning
(`--config.init_from=WORKDIR`) open like any trained one. One module per family maps its names and
shapes (told apart by config.json, in FAMILIES' order) over the shared reader/writer in io.py:

  llama       LlamaForCausalLM (objective ar)            qwen2   Qwen2ForCausalLM (ar)
  gpt2        GPT2LMHeadModel (ar)                       llada   LLaDA (diffusion)
  dream       Dream (diffusion)                          bert    BertForMaskedLM (diffusion)
  roberta     RobertaForMaskedLM (diffusion)             modernbert  ModernBertForMaskedLM (diffusion)

A family module has NAME, optionally DATA (config.data fields of its workdirs), matches(hf_config), settings(folder, hf_config) -> (ModelConfig fields,
objective, {"eos_id", "mask_id"}) and param_parts(tensors, ModelConfig) -> [(top-level name, make)] (each part
reads its tensors when made: the import holds one block or table at a time and writes the workdir's
parameters-only checkpoint part by part); a family that exports also has
writes(ModelConfig), tensors_of(params, ModelConfig) and export_config(ModelConfig, tokenizer).

Export writes the first layout in EXPORTS that holds the model: BERT's or RoBERTa's (BertForMaskedLM /
RobertaForMaskedLM), ModernBERT's, else LLaMA's (Qwen2's where the model has q/k/v biases), so that
other tools load what was trained here. config.json carries a "diffusion_lm" section with the full model
configuration: a bidirectional model needs a bidirectional mask elsewhere, and importing the folder back
restores the workdir's model exactly (every table row included, so export -> import is the identity on
the parameters).
"""

from absl import flags

from diffusion_lm import experiment, generation_config, loading
from diffusion_lm.convert import bert, dream, gpt2, io, llada, llama, modernbert, qwen2, roberta
from diffusion_lm.convert.io import SECTION, read_safetensors, write_workdir  # noqa: F401 (the package's API)
from diffusion_lm.errors import UserError, cli_main
from diffusion_lm.model import ModelConfig

FAMILIES = (llada, dream, llama, qwen2, gpt2, bert, roberta, modernbert)
EXPORTS = (bert, roberta, modernbert, llama)


def family_of(hf: dict):
  """The family module of a config.json."""
  for family in FAMILIES:
    if family.matches(hf):
      return family
  raise UserError(f"config.json model_type={hf.get('model_type')!r}; allowed: "
                  f"{', '.join(f.NAME for f in FAMILIES)}")


def model_settings(folder: str, hf: dict, family) -> tuple[dict, str, dict]:
  """(ModelConfig fields with vocab_size, objective, {"eos_id", "mask_id"}) of a config.json."""
  if SECTION in hf:  # exported here: the model exactly as it was
    section = dict(hf[SECTION])
    # Instruction tuning is a way of training a masked diffusion model, on data the folder does not hold.
    objective = "diffusion" if section["objective"] == "sft" else section["objective"]
    return section["model"], objective, {"eos_id": hf.get("eos_token_id"),
                                         "mask_id": section["model"].get("mask_token_id", -1)}
  return family.settings(folder, hf)


def import_hf(folder: str, workdir: str, max_len: int = 0, seq_len: int = 128, dtype: str = "float32") -> dict:
  """Converts the Hugging Face folder into `workdir` (parameters only, stored in `dtype`, read and written
  one tensor / block at a time); returns a summary (family, objective, parameters)."""
  hf = io.read_hf_config(folder)
  family = family_of(hf)
  fields, objective, ids = model_settings(folder, hf, family)
  if max_len:
    if fields.get("position") == "learned" and max_len > fields["max_len"]:
      raise UserError(f"--max_len={max_len} exceeds the checkpoint's {fields['max_len']} learned positions")
    fields["max_len"] = max_len
  elif SECTION not in hf:
    fields["max_len"] = min(fields["max_len"], 4096)  # the decoding cache holds max_len positions
  cfg = ModelConfig(**fields)
  tensors = io.Tensors.of_folder(folder)
  if cfg.tie_embeddings:
    tensors = tensors.without("lm_head.weight")
  tokenizer = io.hf_tokenizer(folder, cfg.vocab_size, ids["eos_id"], ids["mask_id"])
  sampling = generation_config.sampling_defaults(folder, family.NAME) if objective == "diffusion" else {}
  parts = [(name, _fitted(make, folder)) for name, make in family.param_parts(tensors, cfg)]
  written = io.write_workdir(workdir, fields, objective, tokenizer, parts, seq_len, getattr(family, "DATA", None),
                             sampling, dtype=dtype)
  io.copy_template(folder, workdir)
  name = family.NAME if SECTION not in hf else f"diffusion_lm export ({family.NAME} layout)"
  return {"family": name, "objective": objective, "parameters": written["parameters"], "dtype": dtype,
          "vocab_size": cfg.vocab_size, "mask_id": tokenizer.mask_id, "eos_id": tokenizer.eos_id}


def _fitted(make, folder: str):
  """make() with a reshape of a tensor whose size config.json does not predict named in one line."""
  def fitted():
    try:
      return make()
    except ValueError as e:
      if isinstance(e, UserError):
        raise
      raise UserError(f"the tensors in {folder!r} do not fit its config.json ({' '.join(str(e).split())[:200]}); "
                      "allowed: the config.json that came with these safetensors") from None
  return fitted



def export_family(cfg: ModelConfig):
  """The family module whose layout holds the model."""
  for family in EXPORTS:
    if family.writes(cfg):
      return family
  raise UserError("export writes the BERT, RoBERTa, ModernBERT or LLaMA layout; this model has "
                  f"norm={cfg.norm!r}, norm_position={cfg.norm_position!r}, mlp={cfg.mlp!r}, "
                  f"position={cfg.position!r}, time_conditioning={cfg.time_conditioning}; allowed: a model of "
                  "one of those layouts")


def export_hf(workdir: str, folder: str, use_ema: bool = True) -> list[str]:
  """Writes the workdir's model as a Hugging Face folder; returns the files written. The parameters are
  read one top-level part (a block, a table) at a time and each tensor is written as it is made."""
  params = loading.StoredParams(workdir, use_ema=use_ema)  # a LoRA workdir: merged part by part
  try:
    config, cfg, tokenizer = params.config, params.model.config, params.tokenizer
    family = export_family(cfg)
    model_fields = dict(experiment.config_to_dict(config)["model"])
    model_fields["vocab_size"] = cfg.vocab_size
    hf = {**family.export_config(cfg, tokenizer),
          SECTION: {"model": model_fields, "objective": config.objective, "mask_id": tokenizer.mask_id}}
    return io.write_folder(folder, family.tensors_of(params, cfg), hf, tokenizer, cfg.padded_vocab,
                           sampling=config.sampling, chat_template=io.read_workdir_template(workdir))
  finally:
    params.close()


# ----------------------------------------------------------------------------- command line


def define_flags():
  flags.DEFINE_string("from_hf", None, "Import: a local Hugging Face checkpoint folder (config.json, "
                      "*.safetensors, tokenizer.json).")
  flags.DEFINE_string("to_hf", None, "Export: the folder to write (safetensors + config.json + tokenizer).")
  flags.DEFINE_string("workdir", None, "The workdir to write (import) or read (export).")
  flags.DEFINE_integer("max_len", 0, "Import: longest sequence the model accepts (default: the checkpoint's, "
                       "at most 4096; the decoding cache holds this many positions).")
  flags.DEFINE_integer("seq_len", 128, "Import: data.seq_len of the workdir's config (sample / evaluate default).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Import: the stored parameters' dtype (training "
                    "restores them as float32; sample / evaluate may keep bfloat16 with --param_dtype).")
  flags.DEFINE_bool("raw_params", False, "Export: the raw parameters instead of the EMA parameters.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  f = flags.FLAGS
  if not f.workdir or bool(f.from_hf) == bool(f.to_hf):
    raise UserError("convert needs --workdir and exactly one of --from_hf (import) or --to_hf (export)")
  if f.from_hf:
    summary = import_hf(f.from_hf, f.workdir, f.max_len, f.seq_len, f.dtype)
    print(f"imported {summary['family']} ({summary['parameters']:,} {summary['dtype']} parameters, vocab {summary['vocab_size']}, "
          f"[MASK] id {summary['mask_id']}, end-of-text id {summary['eos_id']}) as objective "
          f"{summary['objective']!r} into {f.workdir}")
  else:
    written = export_hf(f.workdir, f.to_hf, use_ema=not f.raw_params)
    print(f"exported {f.workdir} to {f.to_hf}: {', '.join(written)}")
