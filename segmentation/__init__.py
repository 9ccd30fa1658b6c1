"""Zero-shot segmentation evaluation: saliency -> post-processing -> SAM prompts -> metrics."""
