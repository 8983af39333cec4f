"""Run under torchrun (2 ranks, gloo): a LoRA run whose adapters do not train, with AdapterGuard.

argv: OUT SCENARIO. SCENARIO is ``lr0`` (learning rate 0: lora_B still zero at check_step 3), ``gc`` (gradient
checkpointing with use_reentrant=True and no input grads: no gradient reaches the layers' adapters) or ``healthy``.
Each rank writes rank<R>.json: whether it was stopped, the error's text and step, and how many steps it ran.
"""

import json
import sys
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from trainguard import AdapterError
from trainguard.callbacks.adapter_guard import AdapterGuard

from _rig import exit_worker, make_tiny_llama, make_trainer


class Steps(TrainerCallback):
    n = 0

    def on_step_end(self, args, state, control, **kwargs):
        Steps.n += 1
        return control


out, scenario = Path(sys.argv[1]), sys.argv[2]
targets = ["q_proj", "v_proj"] + (["lm_head"] if scenario == "gc" else [])
model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
extra = {}
if scenario == "gc":  # what transformers 4.x does for a PeftModel: no input grads (see tests/test_adapter_guard.py)
    model.base_model.model.enable_input_require_grads = lambda: None
    extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
lr = 0.0 if scenario == "lr0" else 1e-3
trainer = make_trainer(
    out / "run",
    model=model,
    callbacks=[AdapterGuard(check_step=3), Steps()],
    max_steps=6,
    learning_rate=lr,
    ddp_backend="gloo",
    **extra,
)
doc = {"stopped": False}
try:
    trainer.train()
except AdapterError as err:
    doc.update(stopped=True, what=err.what, step=err.where.get("step"))
doc["steps"] = Steps.n
(out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(doc))
exit_worker()
