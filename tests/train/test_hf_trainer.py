"""The Hugging Face Trainer callback: ADMM in ``trainer.train()``, hard prune, masked fine-tuning."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from admmcompress.plan import Plan, Rule  # noqa: E402
from admmcompress.structures import NM, Filter, Unstructured  # noqa: E402
from admmcompress.train.hf_trainer import ADMMTrainerCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Class = whether token 1 appears: learnable in a few steps."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 50, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForSequenceClassification(config)


def train(model, callback, tmp_path, epochs: int, **extra):
    args = transformers.TrainingArguments(
        str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, disable_tqdm=True, **extra,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    return trainer


def test_admm_then_masked_fine_tune_in_one_train_call(tmp_path):
    model = classifier()
    plan = Plan([Rule(NM(n=2, m=4), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=2, options={"rho": 1e-2}, update_every_steps=2)
    trainer = train(model, callback, tmp_path, epochs=3)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    runs = (weight.detach().reshape(-1, 4) != 0).sum(1)
    assert callback.driver is None and callback.masks is not None
    assert int(runs.max()) <= 2 and int((weight == 0).sum()) == weight.numel() // 2  # 2:4 held through fine-tune
    logged = [entry for entry in trainer.state.log_history if "admm/penalty" in entry]
    assert logged and all(entry["admm/penalty"] >= 0 for entry in logged)
    assert any(key.startswith("admm/") and key != "admm/penalty" for key in logged[-1])


def test_the_penalty_gradient_is_added_once_before_each_optimizer_step(tmp_path):
    """What the trainer calls, in its order: backward of the data loss, then on_pre_optimizer_step."""
    from types import SimpleNamespace

    model = classifier()
    plan = Plan([Rule(Unstructured(sparsity=0.9), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=1, options={"rho": 0.5})
    args = SimpleNamespace(fp16=False, gradient_accumulation_steps=2)
    callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=4), None, model=model, optimizer=None)
    callback.driver.step()  # Z, U away from W so the penalty's gradient is not zero
    batch = Tokens()[0]
    out = model(**{k: v.unsqueeze(0) for k, v in batch.items()})
    out.loss.backward()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    data_grad = weight.grad.clone()
    (expected,) = torch.autograd.grad(callback.driver.penalty(), weight)
    callback.on_pre_optimizer_step(args, None, None)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(weight.grad, data_grad + expected)


def test_resuming_a_trainer_checkpoint_is_refused_not_silently_restarted():
    from types import SimpleNamespace

    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=1)
    args = SimpleNamespace(fp16=False, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="would restart ADMM from scratch"):
        callback.on_train_begin(args, SimpleNamespace(global_step=12, max_steps=20), None, model=classifier())


def test_bad_arguments_are_one_clear_line():
    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*intermediate.dense")])
    with pytest.raises(ValueError, match="admm_epochs=0 must be an integer >= 1"):
        ADMMTrainerCallback(plan, admm_epochs=0)
    with pytest.raises(ValueError, match="update_every_steps=0 must be a positive integer"):
        ADMMTrainerCallback(plan, admm_epochs=1, update_every_steps=0)
    with pytest.raises(ValueError, match="nope"):
        ADMMTrainerCallback(plan, admm_epochs=1, method="nope")


def llama_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


class LMTokens(Tokens):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


SWIGLU = [Rule(Filter(sparsity=0.5), match="*mlp.*_proj", exclude="*down_proj")]


def test_a_coupled_plan_trains_into_a_model_that_compacts(tmp_path):
    """Resolved per layer, SwiGLU's gate and up projections zeroed different rows and compaction refused the trained
    model (a review's finding); coupling='strict' traces the first batch and prunes them together."""
    from admmcompress.executors.compact import compact

    model = llama_lm()
    callback = ADMMTrainerCallback(Plan(SWIGLU), admm_epochs=1, options={"rho": 1e-2}, coupling="strict")
    args = transformers.TrainingArguments(str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=LMTokens(), callbacks=[callback]).train()
    x = {"input_ids": LMTokens().ids[:2]}
    result = compact(model.eval(), x, callback.masks)
    assert result.model.model.layers[0].mlp.gate_proj.out_features == 32 and result.max_abs_diff <= 1e-4


def test_per_layer_targets_on_tied_layers_are_warned_and_coupling_is_checked():
    from admmcompress.train.framework_hooks import resolve_for_callback

    model, x = llama_lm(), {"input_ids": LMTokens().ids[:2]}
    with pytest.warns(RuntimeWarning, match=r"tied \('model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj'\)"
                                            ".* pass coupling='strict'"):
        resolve_for_callback(model, Plan(SWIGLU), "none", lambda: x, "ADMMTrainerCallback")
    with pytest.raises(ValueError, match="coupling='tied'; choose one of"):
        ADMMTrainerCallback(Plan(SWIGLU), admm_epochs=1, coupling="tied")
    with pytest.raises(ValueError, match="give the Plan, not resolved targets"):
        ADMMTrainerCallback(Plan(SWIGLU).resolve(model), admm_epochs=1, coupling="strict")
    with pytest.raises(ValueError, match=r"coupling='strict' needs a method that drives coupled targets, one of \["):
        ADMMTrainerCallback(Plan(SWIGLU), admm_epochs=1, method="reweighted", coupling="strict")
