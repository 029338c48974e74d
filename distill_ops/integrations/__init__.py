"""Drop-ins for existing trainers (imported on demand, so distill_ops needs neither):

- ``distill_ops.integrations.hf_trainer.DistillationTrainer``: transformers.Trainer + kd_loss.
- ``distill_ops.integrations.trl.generalized_jsd_loss`` / ``patch_gkd_trainer``: TRL's GKD loss.
- ``distill_ops.integrations.torchtune.ForwardKLWithChunkedOutputLoss`` and the other
  ``torchtune.modules.loss`` KD losses, for torchtune's distillation recipes.
"""
