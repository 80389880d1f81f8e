# The example programs refuse bad command lines with exit code 2 (3: input files missing) and one line on
# stderr that names the problem (examples/common/cli.hpp). Each case: program, expected exit code, a regex
# the line must match, the arguments. Cases marked MODEL need the model files (skipped without them).
set(kvtrim_cli_dir ${CMAKE_CURRENT_BINARY_DIR}/cli_cases)
file(MAKE_DIRECTORY ${kvtrim_cli_dir}/full_run)
function(kvtrim_cli_case name program exit match)
  cmake_parse_arguments(C "MODEL" "PREPARE;CONTENT" "" ${ARGN})
  if(NOT TARGET ${program})
    return()
  endif()
  string(REPLACE ";" "|" args "${C_UNPARSED_ARGUMENTS}")  # expect_error.cmake splits at '|' 
  add_test(NAME examples.cli.${program}.${name}
           COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${program}> "-DARGS=${args}" -DEXIT=${exit}
                   "-DMATCH=${match}" -DNEEDS_MODEL=${C_MODEL} "-DPREPARE=${C_PREPARE}" "-DCONTENT=${C_CONTENT}"
                   -P ${CMAKE_CURRENT_SOURCE_DIR}/expect_error.cmake)
  set_tests_properties(examples.cli.${program}.${name} PROPERTIES SKIP_REGULAR_EXPRESSION "SKIPPED:" TIMEOUT 60)
endfunction()

set(nowhere ${kvtrim_cli_dir}/no/such/file.bin)
# generate
kvtrim_cli_case(unknown_policy generate 2 "^generate: unknown policy 'bogus'; the registered policies are full, streaming, h2o.*ems" --policy bogus)
kvtrim_cli_case(steps_not_a_number generate 2 "^generate: --steps: 'abc' is not an integer" --steps abc)
kvtrim_cli_case(steps_too_large generate 2 "^generate: --steps: 99999999999 is out of range 1\\.\\." --steps 99999999999)
kvtrim_cli_case(steps_beyond_context generate 2 "--steps: 600 is out of range 1\\.\\.512 \\(the model's context\\)" --steps 600 MODEL)
kvtrim_cli_case(budget_zero generate 2 "^generate: --budget: 0 is out of range" --budget 0)
kvtrim_cli_case(unknown_option generate 2 "^generate: unknown option '--stpes'; the options are --models, .*--steps" --stpes 5)
kvtrim_cli_case(missing_value generate 2 "^generate: option --policy needs a value" --policy)
kvtrim_cli_case(unknown_param generate 2 "unknown parameter 'recent'; this policy has the parameters heavy_ratio" --policy h2o --param recent=24)
kvtrim_cli_case(bad_param_value generate 2 "parameter heavy_ratio: 'lots' is not a number" --policy h2o --param heavy_ratio=lots)
kvtrim_cli_case(needs_basis generate 2 "eigen\\+h2o stores low-rank keys and needs --basis" --policy eigen+h2o)
kvtrim_cli_case(checkpoint_is_directory generate 2 "^generate: checkpoint .* is a directory, not a file" --model ${kvtrim_cli_dir})
kvtrim_cli_case(checkpoint_missing generate 3 "^generate: checkpoint .*no/such/file.bin not found" --model ${nowhere})
kvtrim_cli_case(budget_and_plan generate 2 "give --budget or --plan, not both" --budget 8 --plan x.kvb)
kvtrim_cli_case(bad_plan_file generate 1 "BudgetPlan::load.*bad magic" --plan ${kvtrim_cli_dir}/bad.kvb MODEL
                PREPARE ${kvtrim_cli_dir}/bad.kvb CONTENT "this is not a budget plan file")
# compare_policies
kvtrim_cli_case(budgets_not_numbers compare_policies 2 "^compare_policies: --budgets: 'abc' is not an integer" --budgets 32,abc)
kvtrim_cli_case(budgets_empty_item compare_policies 2 "--budgets: '32,,64' has an empty item" --budgets 32,,64)
kvtrim_cli_case(unknown_configuration compare_policies 2 "--policies: no configuration named 'bogus'; the configurations are StreamingLLM, H2O" --policies bogus)
kvtrim_cli_case(unknown_param compare_policies 2 "configuration H2O: unknown parameter 'recent'; this policy has the parameters heavy_ratio" --param h2o.recent=24)
kvtrim_cli_case(param_bad_value compare_policies 2 "parameter sinks: '-x' is not an integer" --param StreamingLLM.sinks=-x)
kvtrim_cli_case(param_unknown_name compare_policies 2 "no configuration or policy named 'nosuch'; configurations: StreamingLLM" --param nosuch.k=1)
kvtrim_cli_case(param_syntax compare_policies 2 "--param 'sinks=4': expected NAME.key=value" --param sinks=4)
kvtrim_cli_case(add_unknown_policy compare_policies 2 "configuration X: unknown policy 'bogus'; the registered policies are full" --add X=bogus)
kvtrim_cli_case(add_bad_plan compare_policies 2 "plan 'sometimes' is not global or per-layer" --add X=h2o@sometimes)
kvtrim_cli_case(footing compare_policies 2 "--footing: 'equal' is not attended or budget" --footing equal)
kvtrim_cli_case(prompt_too_long compare_policies 2 "--prompt 200 must leave at least 2 tokens of the window \\(128\\)" --window 128 --prompt 200)
kvtrim_cli_case(calibration_overlaps compare_policies 2 "--calib-offset 1000 lies inside the evaluated text" --calib-offset 1000)
kvtrim_cli_case(flag_with_value compare_policies 2 "option --no-plots takes no value" --no-plots=yes)
kvtrim_cli_case(energy_range compare_policies 2 "--eigen-energy: 1.5 is out of range" --eigen-energy 1.5)
kvtrim_cli_case(checkpoint_is_directory compare_policies 2 "checkpoint .* is a directory, not a file" --model ${kvtrim_cli_dir})
kvtrim_cli_case(checkpoint_missing compare_policies 3 "checkpoint .*no/such/file.bin not found; get stories260K.bin" --model ${nowhere})
kvtrim_cli_case(quick_keeps_full_run compare_policies 2 "--quick would overwrite the full run in .*full_run" --quick --out ${kvtrim_cli_dir}/full_run MODEL
                PREPARE ${kvtrim_cli_dir}/full_run/results.csv CONTENT "# kvtrim compare_policies\n# mode: full\n")
# visualize_kept
kvtrim_cli_case(unknown_configuration visualize_kept 2 "--policies: no drawable configuration named 'bogus'; they are StreamingLLM, H2O" --policies bogus)
kvtrim_cli_case(budget_not_a_number visualize_kept 2 "^visualize_kept: --budget: '6x' is not an integer" --budget 6x)
kvtrim_cli_case(window_too_small visualize_kept 2 "--window: 1 is out of range 2\\.\\." --window 1)
kvtrim_cli_case(layer_beyond_model visualize_kept 2 "--layer: 9 is out of range 0\\.\\.4" --layer 9 MODEL)
kvtrim_cli_case(unexpected_argument visualize_kept 2 "unexpected argument 'H2O'; the options are" H2O)
# MODEL: the checkpoint is opened before the text, so without the model the case meets that error and skips
kvtrim_cli_case(text_missing visualize_kept 3 "text .*no/such/file.bin not found" --text ${nowhere} MODEL)
# soak
kvtrim_cli_case(steps_not_a_number soak 2 "^soak: steps: 'abc' is not an integer" abc)
kvtrim_cli_case(steps_zero soak 2 "^soak: steps: 0 is out of range 1\\.\\." 0)
kvtrim_cli_case(too_many_arguments soak 2 "unexpected argument 'x'" 10 h2o x)
# batch_generate
kvtrim_cli_case(batch_zero batch_generate 2 "^batch_generate: --batch: 0 is out of range 1\\.\\." --batch 0)
kvtrim_cli_case(threads_not_a_number batch_generate 2 "--threads: 'two' is not an integer" --threads two)
kvtrim_cli_case(unknown_policy batch_generate 2 "unknown policy 'bogus'; the registered policies are full" --policy bogus)
kvtrim_cli_case(steps_beyond_context batch_generate 2 "--steps: 600 is out of range 1\\.\\.512 \\(the model's context\\)" --steps 600 MODEL)
kvtrim_cli_case(prompt_longer_than_steps batch_generate 2 "prompt 2 has [0-9]+ tokens \\(BOS included\\), more than --steps 3" --steps 3 "Hi" "Once upon a time there was a girl" MODEL)
kvtrim_cli_case(kv_dtype_unknown batch_generate 2 "--kv-dtype: 'fp8' is not a storage type; expected float, half or bf16" --kv-dtype fp8)
kvtrim_cli_case(budget_too_small batch_generate 1 "StreamingLLM: sinks \\(4\\) must leave room for a window in the budget 4" --policy streaming --budget 4 MODEL)
# --help prints the usage on stdout and exits 0.
foreach(program generate compare_policies visualize_kept soak batch_generate)
  if(TARGET ${program})
    add_test(NAME examples.cli.${program}.help COMMAND ${program} --help)
    set_tests_properties(examples.cli.${program}.help PROPERTIES PASS_REGULAR_EXPRESSION "--out|--steps|steps" TIMEOUT 60)
  endif()
endforeach()
