"""Preference-pair datasets: generate candidate negatives, judge them, write Hugging Face datasets."""
