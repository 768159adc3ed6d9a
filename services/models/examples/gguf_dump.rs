//! Prints a GGUF file's metadata and tensor table (a debugging aid).
use candle_core::quantized::gguf_file;

fn main() {
    let path = std::env::args().nth(1).expect("path");
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    println!("{:?} data offset {}", c.magic, c.tensor_data_offset);
    let mut keys: Vec<_> = c.metadata.keys().collect();
    keys.sort();
    for k in keys {
        let v = &c.metadata[k];
        let s = format!("{v:?}");
        println!("{k} = {}", &s[..s.len().min(300)]);
    }
    if std::env::args().nth(2).is_some() {
        let toks = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
        let sc = c.metadata["tokenizer.ggml.scores"].to_vec().unwrap();
        let ty = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
        for i in 0..toks.len() {
            println!("{i} {:?} {:?} {:?}", toks[i], sc[i], ty[i]);
        }
    }
}
