"""What convert, calibrate and validate share; each stage imports core, never another stage's internals."""
