"""Target writers: turn a quantized model into what each deployment stack loads."""
