"""Publishing: the generated model card and the push to the Hugging Face Hub."""
