"""Pure tensor math with no optimizer state; each function is testable against a dense reference."""
