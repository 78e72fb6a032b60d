"""Code that runs inside Lathe's stage workloads: data, tokenizer, training, export, serving."""
