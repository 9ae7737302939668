"""Vision-language methods that change what the model looks at: attention-guided cropping (ViCrop) and an
attention-masked augmented view combined in the logits (AGLA-style)."""
