//! Serving many at once through the server: streams on different adapters batched together
//! (each answers what it answers alone), the metrics that show it, and the OpenAI surface
//! beyond chat — logprobs, `/v1/completions` with `echo`, `n`, structured output, tool calls,
//! reasoning, and parameters refused by name.

mod common;

use common::{Client, MODEL, training_server, wait_for_environment_and_model};
use serde_json::{Value, json};

/// A PEFT LoRA folder for SmolLM2's shape (q_proj and v_proj of every layer, rank 4) with
/// seeded random weights, zipped: a real adapter file, different per seed.
fn random_adapter(seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (hidden, kv, rank) = (576usize, 192usize, 4usize);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..30 {
        for (module, out) in [("q_proj", hidden), ("v_proj", kv)] {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            for (name, shape) in [("lora_A", vec![rank, hidden]), ("lora_B", vec![out, rank])] {
                let n: usize = shape.iter().product();
                let data: Vec<u8> = (0..n)
                    .flat_map(|_| rng.gen_range(-0.08f32..0.08).to_le_bytes())
                    .collect();
                tensors.push((format!("{base}.{name}.weight"), shape, data));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.clone(), v)
        })
        .collect();
    let weights = safetensors::tensor::serialize(views, None).unwrap();
    let config = json!({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": MODEL,
        "task_type": "CAUSAL_LM"});
    common::zip_of(&[
        (
            "adapter_config.json".into(),
            config.to_string().into_bytes(),
        ),
        ("adapter_model.safetensors".into(), weights),
    ])
}

fn chat(model: &str, question: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": question}]});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body
}

/// A server with the default model, and a user on it.
async fn alice_with_the_model() -> (common::Server, Client) {
    let server = training_server(&[]);
    let (u, _) = server.client().signup("alice").await;
    wait_for_environment_and_model(&u).await;
    (server, u)
}

/// A chat answer of the default model to `question` (greedy, 24 tokens unless `extra` says).
async fn ask(u: &Client, question: &str, extra: Value) -> common::Reply {
    u.post("/v1/chat/completions", chat(MODEL, question, extra))
        .await
}

/// A streamed chat answer's text.
async fn stream_text(c: &Client, body: Value) -> String {
    stream_chunks(c, body)
        .await
        .iter()
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[tokio::test]
async fn streams_on_four_adapters_are_batched_and_answer_as_alone() {
    let server = training_server(&[("FERROTUNE_MAX_GENERATIONS_PER_USER", "16")]);
    let c = server.client();
    let (admin, _) = c.signup("admin").await;
    wait_for_environment_and_model(&admin).await;
    let mut ids = Vec::new();
    for seed in 0..4 {
        let up = admin
            .upload_to(
                "/api/files/models/adapters",
                &format!("random-{seed}.zip"),
                random_adapter(seed),
                &[("base_model", MODEL)],
            )
            .await;
        assert_eq!(up.status, 201, "{:?}", up.body);
        ids.push(up.body["model_id"].as_str().unwrap().to_string());
    }
    let questions = [
        "Name a colour.",
        "Count to five.",
        "Say hello.",
        "Name a fruit.",
    ];
    let bodies: Vec<Value> = (0..8)
        .map(|i| chat(&ids[i % 4], questions[i % 4], json!({})))
        .collect();
    // Alone, one after the other.
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(stream_text(&admin, b.clone()).await);
    }
    assert_eq!(
        alone[0], alone[4],
        "the same request, the same greedy answer"
    );
    let distinct: std::collections::HashSet<&String> = alone[..4].iter().collect();
    assert!(
        distinct.len() > 1,
        "the adapters answer differently: {alone:?}"
    );
    // Together: 8 streams at once on 4 adapters.
    let together =
        futures_util::future::join_all(bodies.iter().map(|b| stream_text(&admin, b.clone()))).await;
    assert_eq!(
        together, alone,
        "each stream answers in the batch what it answers alone"
    );

    // The metrics saw batched steps of several sequences, and the adapters cached.
    let (status, m, _) = admin.get_bytes("/metrics").await;
    assert_eq!(status, 200);
    let m = String::from_utf8(m).unwrap();
    let count = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let steps = count("ferrotune_batch_sequences_count");
    let single = count("ferrotune_batch_sequences_bucket{le=\"1.0\"}");
    assert!(
        steps > single,
        "some steps advanced several sequences:\n{m}"
    );
    assert!(count("ferrotune_adapter_cache_hits_total") >= 8.0, "{m}");
    assert!(m.contains("ferrotune_prefix_cache_hits_total "), "{m}");
    assert!(count("ferrotune_tokens_generated_total") > 0.0);
    // SmolLM2: 30 layers × 3 KV heads × 64 values, keys and values, in half floats.
    assert!(
        m.contains("ferrotune_kv_cache_bytes_per_token{model=\"SmolLM2-135M-Instruct\"} 23040"),
        "{m}"
    );
    assert!(
        m.contains(
            "ferrotune_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"} 16"
        ),
        "{m}"
    );
    // The gauge follows the worker's bookkeeping after the step that ended the streams: a
    // client may read the metrics between the last event it got and that bookkeeping.
    let idle = [
        "ferrotune_active_sequences{model=\"SmolLM2-135M-Instruct\"} 0",
        "ferrotune_kv_cache_reserved_bytes{model=\"SmolLM2-135M-Instruct\"} 0",
    ];
    let mut last = String::new();
    for _ in 0..50 {
        let (_, m, _) = admin.get_bytes("/metrics").await;
        last = String::from_utf8(m).unwrap();
        if idle.iter().all(|l| last.contains(l)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        idle.iter().all(|l| last.contains(l)),
        "the batch empties, and its KV reservations with it, once every stream ended:\n{last}"
    );
    let (user, _) = c.signup("user").await;
    assert_eq!(user.get("/metrics").await.status, 403);

    // A prompt asked before starts from the prefix cache, and its usage says how much of it
    // (OpenAI's `prompt_tokens_details.cached_tokens`).
    let mut again = bodies[0].clone();
    again["stream"] = json!(false);
    let r = admin.post("/v1/chat/completions", again).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let usage = &r.body["usage"];
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(cached >= 16 && cached < prompt, "{usage}");
    assert_eq!(r.body["choices"][0]["message"]["content"], json!(alone[0]));
}

#[tokio::test]
async fn the_openai_surface_logprobs_completions_n_and_refusals() {
    let (_server, u) = alice_with_the_model().await;

    // Chat logprobs: the greedy token is the most likely one; the texts make the answer.
    let r = ask(
        &u,
        "Name a colour.",
        json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 8}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let choice = &r.body["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        r.body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut bytes = Vec::new();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy picks the most likely token"
        );
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        bytes.extend(
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(
        String::from_utf8_lossy(&bytes).starts_with(text.trim_end()),
        "{text:?}"
    );

    // Completions: the raw prompt continued; the same tokens scored by prefill (`echo`,
    // `max_tokens: 0`) have the log-probabilities decoding gave them.
    let prompt = "1, 2, 3, 4,";
    let generated = u
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2}),
        )
        .await;
    assert_eq!(generated.status, 200, "{:?}", generated.body);
    assert_eq!(generated.body["object"], "text_completion");
    let g = &generated.body["choices"][0];
    let continuation = g["text"].as_str().unwrap().to_string();
    let gen_lps: Vec<f64> = g["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(gen_lps.len(), 4);
    let scored = u
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": format!("{prompt}{continuation}"), "max_tokens": 0,
                   "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(scored.status, 200, "{:?}", scored.body);
    let s = &scored.body["choices"][0];
    assert_eq!(s["text"], format!("{prompt}{continuation}").as_str());
    let lps = s["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null(), "the first token has nothing before it");
    let tokens = s["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(
        tokens[tokens.len() - 4..],
        g["logprobs"]["tokens"].as_array().unwrap()[..]
    );
    for (a, b) in lps[lps.len() - 4..].iter().zip(&gen_lps) {
        assert!((a.as_f64().unwrap() - b).abs() < 2e-3, "{a} vs {b}");
    }
    assert_eq!(scored.body["usage"]["completion_tokens"], 0);

    // n answers, seeded apart; streamed completions make the same text as whole ones.
    let r = ask(
        &u,
        "Write a word.",
        json!({"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 6}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let choices = r.body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(choices[2]["index"], 2);
    let streamed: String = stream_from(
        &u,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}),
    )
    .await
    .iter()
    .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
    .collect();
    assert_eq!(streamed, continuation);

    // One model by id; OpenAI's 404 for no route.
    let m = u.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!((m.status, m.body["id"].as_str()), (200, Some(MODEL)));
    assert_eq!(u.get("/v1/models/nope").await.status, 404);
    let r = u.post("/v1/nope", json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "unknown_url", "{:?}", r.body);

    // What is not supported is refused by name, never ignored.
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
            "tools[0]",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
        ),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}),
            "response_format.json_schema.schema",
        ),
        (json!({"temperature": 3}), "temperature"),
        (json!({"n": 20}), "n"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
    ] {
        let r = u
            .post("/v1/chat/completions", chat(MODEL, "hi", extra.clone()))
            .await;
        assert_eq!(r.status, 422, "{extra}: {:?}", r.body);
        assert_eq!(r.body["error"]["param"], param, "{extra}: {:?}", r.body);
    }
    let img = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
    let r = u.post("/v1/chat/completions", img).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["param"], "messages[0].content[1]");
    // A logit_bias token outside the vocabulary.
    let r = u
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                   "logit_bias": {"99999999": 5}}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);

    // Structured output: the answer follows the schema (constrained decoding), even from a
    // 135M model that would not on its own.
    let schema = json!({"type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20},
                       "age": {"type": "integer", "minimum": 0, "maximum": 150},
                       "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                "maxItems": 3}},
        "required": ["name", "age", "pets"], "additionalProperties": false});
    let question = "Describe a person.";
    let plain = u
        .post(
            "/v1/chat/completions",
            chat(MODEL, question, json!({"max_tokens": 60})),
        )
        .await;
    let plain_text = plain.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert!(
        serde_json::from_str::<Value>(plain_text).is_err(),
        "unconstrained, the model answers in prose: {plain_text}"
    );
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": true}});
    let r = ask(
        &u,
        question,
        json!({"max_tokens": 120, "response_format": format}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    eprintln!("json_schema answer: {text}");
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop", "{text}");
    let person: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let keys: Vec<&String> = person.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["name", "age", "pets"], "{text}");
    assert!(
        person["name"].as_str().unwrap().chars().count() <= 20,
        "{text}"
    );
    assert!(
        (0..=150).contains(&person["age"].as_i64().unwrap()),
        "{text}"
    );
    for pet in person["pets"].as_array().unwrap() {
        assert!(
            ["cat", "dog", "fish"].contains(&pet.as_str().unwrap()),
            "{text}"
        );
    }
    // JSON mode, on several sampled answers at once: each one a JSON object (or, cut by
    // max_tokens, the start of one); streamed too.
    let body = chat(
        MODEL,
        "Give a JSON object with the keys city and country for Paris.",
        json!({"max_tokens": 80, "n": 2, "temperature": 0.8, "seed": 3,
               "response_format": {"type": "json_object"}}),
    );
    let r = u.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let choices = r.body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for choice in choices {
        let text = choice["message"]["content"].as_str().unwrap();
        eprintln!("json_object answer ({}): {text}", choice["finish_reason"]);
        if choice["finish_reason"] == "stop" {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v.is_object(), "{text}");
        } else {
            assert!(
                text.trim_start().starts_with('{'),
                "cut by max_tokens: {text}"
            );
        }
    }
    let mut one = body;
    one["n"] = json!(1);
    let streamed = stream_text(&u, one).await;
    assert!(streamed.trim_start().starts_with('{'), "{streamed}");
}

/// The `data:` objects of a streamed chat answer.
async fn stream_chunks(c: &Client, body: Value) -> Vec<Value> {
    stream_from(c, "/v1/chat/completions", body).await
}

/// The `data:` objects of a stream from `path`.
async fn stream_from(c: &Client, path: &str, body: Value) -> Vec<Value> {
    let mut body = body;
    body["stream"] = json!(true);
    let resp = c
        .http
        .post(format!("{}{path}", c.base))
        .bearer_auth(c.token.as_deref().unwrap())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .collect()
}

#[tokio::test]
async fn tools_are_called_and_reasoning_is_kept_apart() {
    let (_server, u) = alice_with_the_model().await;

    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false}}});
    let time = json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string",
            "maxLength": 30}}, "required": ["zone"], "additionalProperties": false}}});
    let question = "What is the weather in Paris?";
    // `required`: SmolLM2's template knows nothing of tools; they are described in its
    // system message and the call is enforced, so even a 135M model calls one.
    let r = ask(
        &u,
        question,
        json!({"max_tokens": 80, "tools": [weather, time], "tool_choice": "required",
                       "parallel_tool_calls": false}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let choice = &r.body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
    assert_eq!(choice["message"]["content"], Value::Null, "{choice}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{choice}");
    let call = &calls[0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let name = call["function"]["name"].as_str().unwrap();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {call}"));
    eprintln!("required call: {name} {args}");
    match name {
        "get_weather" => {
            assert!(args["city"].is_string(), "{args}");
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        }
        "get_time" => assert!(args["zone"].is_string(), "{args}"),
        other => panic!("called {other}"),
    }

    // A named function, streamed: the call comes in a delta, the answer ends `tool_calls`.
    let chunks = stream_chunks(
        &u,
        chat(
            MODEL,
            question,
            json!({"max_tokens": 80, "tools": [weather, time],
                   "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        ),
    )
    .await;
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]).collect();
    let streamed: Vec<&Value> = deltas
        .iter()
        .filter_map(|d| d["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), 1, "{chunks:?}");
    assert_eq!(streamed[0]["index"], 0);
    assert_eq!(streamed[0]["function"]["name"], "get_time");
    let args: Value =
        serde_json::from_str(streamed[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["zone"].is_string(), "{args}");
    assert_eq!(
        deltas.last().unwrap()["finish_reason"],
        "tool_calls",
        "{chunks:?}"
    );
    assert!(
        deltas
            .iter()
            .all(|d| d["delta"].get("content").is_none() || d["delta"]["content"] == ""),
        "no text beside a forced call: {chunks:?}"
    );

    // The conversation goes on with the call and its result (`tool` role); `tool_choice:
    // "none"` answers in text.
    let follow = json!({"model": MODEL, "temperature": 0, "max_tokens": 24,
        "tools": [weather], "tool_choice": "none",
        "messages": [{"role": "user", "content": question},
                     {"role": "assistant", "content": null, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}]});
    let r = u.post("/v1/chat/completions", follow.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert!(r.body["choices"][0]["message"].get("tool_calls").is_none());
    // `auto`: the model decides; whatever it says comes back as text or as parsed calls.
    let mut auto = follow;
    auto["tool_choice"] = json!("auto");
    let r = u.post("/v1/chat/completions", auto).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let m = &r.body["choices"][0]["message"];
    assert!(
        m["content"].is_string() || m["tool_calls"].is_array(),
        "{m}"
    );
    // A call in a message that is not the assistant's is refused by name.
    let r = u
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x",
                   "tool_calls": [call]}]}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["param"], "messages[0].tool_calls");
    // Without a `<think>` an answer has no reasoning.
    assert!(m.get("reasoning_content").is_none(), "{m}");

    // A reasoning model whose template opens `<think>` for the answer: SmolLM2 under such a
    // template (its own files, the template changed), on a server of its own.
    let models = tempfile::tempdir().unwrap();
    let real = common::test_models_dir().join(MODEL);
    std::os::unix::fs::symlink(&real, models.path().join(MODEL)).unwrap();
    let thinker = models.path().join("SmolLM2-thinking");
    std::fs::create_dir(&thinker).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer_config.json" {
            std::os::unix::fs::symlink(entry.path(), thinker.join(entry.file_name())).unwrap();
        }
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(real.join("tokenizer_config.json")).unwrap())
            .unwrap();
    config["chat_template"] = json!(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    );
    std::fs::write(
        thinker.join("tokenizer_config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let server = common::Server::start_with(Some(models.path()), &[]);
    let c = server.client();
    let (u, _) = c.signup("bob").await;
    let body = json!({"model": "SmolLM2-thinking", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Is 7 a prime?"}]});
    let r = u.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let m = &r.body["choices"][0]["message"];
    let reasoning = m["reasoning_content"].as_str().unwrap_or_default();
    eprintln!("reasoning: {m}");
    assert!(!reasoning.trim().is_empty(), "{m}");
    // Streamed alike: reasoning deltas, then (if the model closed the block) content.
    let chunks = stream_chunks(&u, body).await;
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, reasoning);
    assert_eq!(content, m["content"].as_str().unwrap());
}

#[tokio::test]
async fn beyond_the_batch_requests_queue_and_beyond_the_limit_get_429() {
    let server = training_server(&[
        ("FERROTUNE_MAX_BATCH_SEQUENCES", "1"),
        ("FERROTUNE_MAX_CONCURRENT_GENERATIONS", "3"),
        ("FERROTUNE_MAX_GENERATIONS_PER_USER", "16"),
        // The 32-bit KV cache, chosen by setting: its positions take twice the bytes.
        ("FERROTUNE_KV_CACHE_DTYPE", "f32"),
    ]);
    let c = server.client();
    let (u, _) = c.signup("alice").await;
    wait_for_environment_and_model(&u).await;
    // Loads the model first, so that the burst below overlaps.
    let warm = u
        .post(
            "/v1/chat/completions",
            chat(MODEL, "hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(warm.status, 200, "{:?}", warm.body);
    let send = |i: usize| {
        let u = &u;
        async move {
            u.http
                .post(format!("{}/v1/chat/completions", u.base))
                .bearer_auth(u.token.as_deref().unwrap())
                .json(&chat(
                    MODEL,
                    &format!("Count to {}.", i + 3),
                    json!({"max_tokens": 16}),
                ))
                .send()
                .await
                .unwrap()
        }
    };
    let replies = futures_util::future::join_all((0..5).map(send)).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    let queued: Vec<u64> = replies
        .iter()
        .filter_map(|r| r.headers().get("x-queue-position"))
        .filter_map(|v| v.to_str().ok()?.parse().ok())
        .collect();
    assert!(
        !queued.is_empty() && queued.iter().all(|p| *p >= 1),
        "{queued:?}"
    );
    for r in replies {
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        } else {
            let body: Value = r.json().await.unwrap();
            assert!(body["choices"][0]["message"]["content"].as_str().is_some());
        }
    }
    let (_, m, _) = u.get_bytes("/metrics").await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("ferrotune_kv_cache_bytes_per_token{model=\"SmolLM2-135M-Instruct\"} 46080"),
        "{m}"
    );

    // A running sequence holds its reservation (prompt + max_tokens positions at 46080 bytes
    // each), and a client that goes away gives it back.
    let reserved = || async {
        let (_, m, _) = u.get_bytes("/metrics").await;
        let m = String::from_utf8(m).unwrap();
        m.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "ferrotune_kv_cache_reserved_bytes{model=\"SmolLM2-135M-Instruct\"} ",
                )
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no reservation gauge:\n{m}"))
    };
    let long = u
        .http
        .post(format!("{}/v1/chat/completions", u.base))
        .bearer_auth(u.token.as_deref().unwrap())
        .json(&chat(
            MODEL,
            "Tell me a long story.",
            json!({"max_tokens": 1000, "ignore_eos": true, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let mut held = 0;
    for _ in 0..100 {
        held = reserved().await;
        if held > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        held >= 1000 * 46080 && held % 46080 == 0,
        "reserved {held} bytes"
    );
    drop(long);
    let mut left = held;
    for _ in 0..100 {
        left = reserved().await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        left, 0,
        "the reservation is freed when the client goes away"
    );
}
