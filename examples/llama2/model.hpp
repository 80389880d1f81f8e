// A small llama2.c-format inference engine whose KV cache is kvtrim (one include for the examples).
//   checkpoint.hpp  loads any llama2.c float32 checkpoint (stories260K, stories15M/42M/110M, ...)
//   tokenizer.hpp   the llama2.c tokenizer (BPE by merge scores, byte fallback)
//   transformer.hpp the forward pass, templated on the kvtrim::KVCache it talks to
#pragma once

#include "checkpoint.hpp"
#include "tokenizer.hpp"
#include "transformer.hpp"
